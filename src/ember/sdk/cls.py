"""`@app.cls` handles: `Embedder().embed.remote(...)`, as in Modal."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ember.sdk.function import Function
from ember.sdk.hooks import hooks_of
from ember.sdk.job import sync_client
from ember.sdk.kinds import kind_of

if TYPE_CHECKING:
    from ember.core.spec import FunctionSpec
    from ember.sdk.client import Client


class Cls:
    def __init__(
        self,
        app: str,
        user_cls: type | None,
        spec: FunctionSpec | None,
        methods: dict[str, Function] | None = None,
    ) -> None:
        self.app_name = app
        self.user_cls = user_cls
        self.spec = spec
        self.name = user_cls.__name__ if user_cls is not None else ""
        self._instance: Any = None
        if methods is not None:
            self.methods = methods
            return
        assert user_cls is not None
        _, _, names = hooks_of(user_cls)
        self.methods = {}
        for n in names:
            handle = Function(
                app,
                f"{self.name}.{n}",
                kind=kind_of(getattr(user_cls, n)),
                local=self._local_method(n),
                skip_self=True,
                spec=spec,
            )
            handle._raw = getattr(user_cls, n)
            self.methods[n] = handle

    def __repr__(self) -> str:
        return f"<ember.Cls {self.app_name}/{self.name}>"

    @classmethod
    def lookup(cls, app: str, name: str, *, client: Client | None = None) -> Cls:
        info = sync_client(client).get_app(app)
        methods = {
            fn["name"].split(".", 1)[1]: Function(
                app, fn["name"], kind=fn["kind"], params=fn["params"], client=client
            )
            for fn in info["functions"]
            if fn["unit"] == name and "." in fn["name"]
        }
        if not methods:
            from ember.errors import NotFound

            raise NotFound(404, "function_not_found", f"app {app!r} has no class {name!r}")
        handle = cls(app, None, None, methods=methods)
        handle.name = name
        return handle

    def __call__(self) -> _Obj:
        return _Obj(self)

    def _local_method(self, name: str) -> Callable[..., Any]:
        def call(*args: Any, **kwargs: Any) -> Any:
            return getattr(self._local_instance(), name)(*args, **kwargs)

        return call

    def _local_instance(self) -> Any:
        """One instance per process for local calls, with its enter hooks run once."""
        if self._instance is None:
            assert self.user_cls is not None
            instance = self.user_cls()
            enters, _, _ = hooks_of(self.user_cls)
            for hook in enters:
                getattr(instance, hook)()
            self._instance = instance
        return self._instance


class _Obj:
    """What `MyCls()` returns: attribute access yields the method's Function handle."""

    def __init__(self, cls: Cls) -> None:
        self._cls = cls

    def __getattr__(self, name: str) -> Function:
        try:
            return self._cls.methods[name]
        except KeyError:
            raise AttributeError(
                f"{self._cls.name} has no @ember.method() named {name!r} "
                f"(it has: {', '.join(self._cls.methods) or 'none'})"
            ) from None
