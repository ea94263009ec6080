"""Liveness: answers as long as the process serves requests."""

from fastapi import APIRouter
from pydantic import BaseModel

from app import __version__

router = APIRouter(tags=["health"])


class Health(BaseModel):
    status: str
    version: str


@router.get("/healthz", response_model=Health, summary="Process is up")
def healthz() -> Health:
    return Health(status="ok", version=__version__)
