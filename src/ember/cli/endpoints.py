"""`ember endpoints`: the RunPod endpoint id of every deployed function.

RunPod's clients (`runpod.Endpoint(ID)`, `curl .../runpod/v2/ID/runsync`) name a function by an
endpoint id: `APP~FN`, or `APP` alone for the app's `handler` function (or its only one). The
list is made here from `GET /v1/apps` by `ember.core.runpod.endpoints`, the rule the server
resolves ids by.
"""

from __future__ import annotations

from typing import Annotated

import typer
from rich.markup import escape
from rich.table import Table

from ember.cli.common import api_client, fail, out, print_json
from ember.core.runpod import endpoints as endpoints_of
from ember.errors import EmberError


def endpoints(
    as_json: Annotated[
        bool,
        typer.Option("--json", help="print a JSON list of {endpoint_id, app, function, aliases}"),
    ] = False,
) -> None:
    """The RunPod endpoint id of each deployed function, for RunPod's clients.

    Point one at `EMBER_URL/runpod/v2` with an ember token as its API key:

        runpod.endpoint_url_base = "http://127.0.0.1:8484/runpod/v2"

        runpod.api_key = "<ember token>"

        runpod.Endpoint("APP~FN").run_sync({"x": 3})
    """
    try:
        client = api_client()
        items = endpoints_of(client.list_apps())
    except EmberError as exc:
        fail(exc)
    if as_json:
        print_json(items)
        return
    if not items:
        out.print("no apps deployed yet: `ember deploy FILE`")
        return
    table = Table("ENDPOINT ID", "APP", "FUNCTION", "ALSO")
    for e in items:
        table.add_row(
            escape(e["endpoint_id"]),
            escape(e["app"]),
            escape(e["function"]),
            escape(", ".join(e["aliases"]) or "-"),
        )
    out.print(table)
    out.print(f"RunPod clients: endpoint_url_base = {client.url}/runpod/v2", highlight=False)
