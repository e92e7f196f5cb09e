"""/api/models: the demo models, local model folders under models_dir, and hub ids the user added."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Literal

from fastapi import APIRouter
from pydantic import BaseModel, Field

from backpropagate.server.routes.deps import SettingsDep
from backpropagate.settings import Settings

router = APIRouter(tags=["models"])

HUB_ID = r"^[A-Za-z0-9][\w.-]*/[\w.-]+$"


class ModelPublic(BaseModel):
    id: str = Field(description="What to put in RunConfig.model.")
    kind: Literal["demo", "local", "hub"]
    path: str | None = None


class ModelAdd(BaseModel):
    id: str = Field(pattern=HUB_ID, max_length=200, description="A Hugging Face hub id, `org/name`.")


def _hub_file(settings: Settings) -> Path:
    return settings.home / "hub_models.json"


def _read_hub(settings: Settings) -> list[str]:
    try:
        return list(json.loads(_hub_file(settings).read_text()))
    except (OSError, ValueError):
        return []


def list_models(settings: Settings) -> list[ModelPublic]:
    from backpropagate.models.demo import DEMO_NAMES

    out = [ModelPublic(id=name, kind="demo") for name in DEMO_NAMES]
    if settings.models_dir.is_dir():
        for folder in sorted(settings.models_dir.iterdir()):
            if (folder / "config.json").is_file() and folder.name not in DEMO_NAMES:
                out.append(ModelPublic(id=str(folder), kind="local", path=str(folder)))
    out += [ModelPublic(id=hub_id, kind="hub") for hub_id in _read_hub(settings)]
    return out


@router.get("/models", response_model=list[ModelPublic])
async def get_models(settings: SettingsDep) -> list[ModelPublic]:
    return await asyncio.to_thread(list_models, settings)


@router.post("/models", status_code=201, response_model=ModelPublic)
async def add_model(body: ModelAdd, settings: SettingsDep) -> ModelPublic:
    """Remember a hub id so that it appears in the model list (nothing is downloaded now)."""

    def add() -> None:
        ids = _read_hub(settings)
        if body.id not in ids:
            ids.append(body.id)
            path = _hub_file(settings)
            tmp = path.with_suffix(".tmp")
            tmp.write_text(json.dumps(ids, indent=2))
            tmp.replace(path)

    await asyncio.to_thread(add)
    return ModelPublic(id=body.id, kind="hub")
