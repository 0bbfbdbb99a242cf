"""The browser side of `ember server`: the dashboard (/ui) and the API reference (/docs, /redoc).

Every file it serves ships inside the package (static/); nothing is fetched from another host.
"""

from fastapi import APIRouter

from ember.web import docs, ui

router = APIRouter(include_in_schema=False)
router.include_router(ui.router)
router.include_router(docs.router)

__all__ = ["router"]
