"""Every Reflex event handler that takes input from the browser, and the policy its input meets.

Paths and ids go through the service (ui_app/state/service.py), which applies the API's path
policy (backpropagate.server.security.paths.safe_path); pages never resolve a path themselves.
tests/test_security_inputs.py fails when a handler with parameters is missing here.
"""

from __future__ import annotations

_SETVAR = "Reflex built-in setter; the value only reaches the server through the handlers below"

HANDLER_POLICIES: dict[str, str] = {
    "HeaderState.setvar": _SETVAR,
    "HeaderState.set_me": "display value only; identity comes from the guard's session",
    "ExportState.setvar": _SETVAR,
    "ExportState.set_run": "run id, looked up by RunService (unknown ids are refused)",
    "ExportState.set_fmt": "export format, checked by the export config model",
    "ExportState.set_quantization": "quantization name, checked by the export config model",
    "ExportState.set_verify": "boolean flag",
    "ExportState.set_ollama_name": "model name, checked by the export config model",
    "ChatState.setvar": _SETVAR,
    "ChatState.set_left": "run id, looked up by RunService",
    "ChatState.set_right": "run id, looked up by RunService",
    "ChatState.set_draft": "chat text, sent to the model only",
    "ChatState.prefer": "column name, left or right (others refused); the replies are the state's own",
    "ChatState.rate": "column name, left or right (others refused), and a boolean",
    "CompareState.setvar": _SETVAR,
    "CompareState.toggle": "run id, looked up by RunService; at most MAX_RUNS",
    "CompareState.pick_metric": "metric label, kept only when it is one of the fixed METRICS labels",
    "NewRunState.setvar": _SETVAR,
    "NewRunState.set_value": "form value; the run config is checked by RunConfig and RunService.submit (paths, fit)",
    "NewRunState.apply_preset": "preset name from the fixed preset table",
    "NewRunState.handle_upload": "upload: allowed types, size limit streamed, generated name (store_upload)",
    "NewRunState.pick_dataset": "uploaded data set id, looked up in the store",
    "NewRunState.pick_example": "example path inside the examples/uploads base (service.example_path)",
    "RunDetailState.setvar": _SETVAR,
    "RunDetailState.open_path": "route /runs/<id>; the id becomes a folder only through service.run_dir",
    "RunsState.setvar": _SETVAR,
    "RunsState.set_filter": "status filter, compared against known statuses",
    "RunsState.stop": "run id, looked up by RunService",
    "RunsState.resume": "run id, looked up by RunService",
    "RunsState.clone": "run id, looked up by RunService",
    "RunsState.ask_delete": "run id, looked up by RunService",
}
