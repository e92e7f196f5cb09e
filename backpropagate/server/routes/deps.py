"""Shared route dependencies: the RunService and the settings of this app."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from backpropagate.runs.service import RunService
from backpropagate.settings import Settings


def get_service(request: Request) -> RunService:
    return request.app.state.service


def get_app_settings(request: Request) -> Settings:
    return request.app.state.settings


ServiceDep = Annotated[RunService, Depends(get_service)]
SettingsDep = Annotated[Settings, Depends(get_app_settings)]
