"""MLflow: one MLflow run per Backpropagate run, tagged with the run id (a resume continues it).

MLflow's own variables apply: ``MLFLOW_TRACKING_URI`` (a server, ``file:/path`` or
``sqlite:///path``; default ``file:RUN_DIR/mlruns``; MLflow 3 wants ``MLFLOW_ALLOW_FILE_STORE=true`` for
a ``file:`` URI of your own), ``MLFLOW_EXPERIMENT_NAME`` (default
``backpropagate``), ``MLFLOW_TRACKING_USERNAME`` / ``_PASSWORD`` / ``_TOKEN``. The client API is used,
not the fluent one, so no global "active run" is left behind in the process.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from backpropagate.events import EventBase
from backpropagate.trackers.metrics import final_metrics, flat_params, scalars_of

RUN_ID_TAG = "backpropagate.run_id"
PARAMS_PER_CALL = 100  # MLflow's limit on params in one log_batch
PARAM_VALUE_MAX = 6000  # and on a param value's length


class MlflowSink:
    def __init__(self, run_dir: Path) -> None:
        self.run_dir = run_dir
        self.client: Any = None
        self.mlflow_run_id: str | None = None

    def _open(self, run_id: str, config: dict[str, Any] | None) -> None:
        from mlflow.tracking import MlflowClient

        uri = os.environ.get("MLFLOW_TRACKING_URI")
        if not uri:
            # MLflow 3 refuses file stores unless allowed; a store it did not choose is allowed here.
            # A URI of the user's own follows MLflow's rules (sqlite needs the full `mlflow`).
            uri = (self.run_dir / "mlruns").resolve().as_uri()
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        self.client = client = MlflowClient(tracking_uri=uri)
        name = os.environ.get("MLFLOW_EXPERIMENT_NAME") or "backpropagate"
        experiment = client.get_experiment_by_name(name)
        experiment_id = experiment.experiment_id if experiment else client.create_experiment(name)
        found = client.search_runs([experiment_id], filter_string=f"tags.`{RUN_ID_TAG}` = '{run_id}'")
        if run_id and found:  # a resumed run continues its MLflow run
            self.mlflow_run_id = found[0].info.run_id
            client.update_run(self.mlflow_run_id, status="RUNNING")
            return
        run = client.create_run(experiment_id, run_name=run_id or None, tags={RUN_ID_TAG: run_id})
        self.mlflow_run_id = run.info.run_id
        if config:
            from mlflow.entities import Param

            params = [Param(k, v[:PARAM_VALUE_MAX]) for k, v in flat_params(config).items()]
            for i in range(0, len(params), PARAMS_PER_CALL):
                client.log_batch(self.mlflow_run_id, params=params[i : i + PARAMS_PER_CALL])
            client.log_dict(self.mlflow_run_id, config, "config.json")

    def on_event(self, event: EventBase) -> None:
        from mlflow.entities import Metric

        kind = event.type  # type: ignore[attr-defined]
        if kind == "run_started":
            if self.client is None:
                self._open(event.run_id, event.config)  # type: ignore[attr-defined]
            return
        if self.client is None:
            self._open(event.run_id, None)
        if self.mlflow_run_id is None:  # already ended
            return
        found = scalars_of(event)
        stamp = int((event.ts or time.time()) * 1000)
        if found is not None:
            _, step, values = found
            metrics = [Metric(k, v, stamp, step) for k, v in values.items()]
            if metrics:
                self.client.log_batch(self.mlflow_run_id, metrics=metrics)
        elif kind == "completed":
            step = int(getattr(event, "step", 0) or 0)
            metrics = [Metric(f"final/{k}", v, stamp, step) for k, v in final_metrics(event).items()]
            if metrics:
                self.client.log_batch(self.mlflow_run_id, metrics=metrics)
            self._finish("FINISHED")
        elif kind == "failed":
            self._finish("FAILED")
        elif kind == "cancelled":
            self._finish("KILLED")

    def _finish(self, status: str) -> None:
        if self.client is not None and self.mlflow_run_id is not None:
            self.client.set_terminated(self.mlflow_run_id, status=status)
            self.mlflow_run_id = None

    def close(self) -> None:
        # A worker that ends without a final event (killed, crashed) leaves a resumable run.
        self._finish("KILLED")
