from backpropagate.errors import CATALOG, BackpropError, ErrorCode

REQUIRED = [
    "RUNTIME_GPU_OOM",
    "RUNTIME_OOM_RECOVERY_EXHAUSTED",
    "DEP_MODEL_LOAD_FAILED",
    "DEP_OLLAMA_REGISTRATION_FAILED",
    "STATE_CHECKPOINT_INVALID",
    "RUNTIME_GPU_TEMPERATURE_CRITICAL",
    "RUNTIME_GPU_MONITORING_FAILED",
    "CONFIG_INVALID",
    "CONFIG_INVALID_SETTING",
    "RUNTIME_GGUF_EXPORT_FAILED",
    "RUNTIME_UI_AUTH_NOT_ENFORCED",
    "INPUT_AUTH_INVALID_SHAPE",
    "DEP_GPU_NOT_AVAILABLE",
    "DEP_MLX_UNAVAILABLE",
    "DATASET_PARSE_FAILED",
    "DATASET_FORMAT_UNSUPPORTED",
    "UI_OUTPUT_DIR_FORBIDDEN",
    "INPUT_PATH_TRAVERSAL",
]


def test_catalog_has_every_required_code_with_a_hint():
    for code in REQUIRED:
        spec = CATALOG[ErrorCode(code)]
        assert spec.hint and spec.title
    assert set(CATALOG) == set(ErrorCode)


def test_error_carries_catalog_defaults_and_overrides():
    err = BackpropError(ErrorCode.RUNTIME_GPU_OOM, "out of memory at step 3", step=3)
    assert str(err) == "[RUNTIME_GPU_OOM] out of memory at step 3"
    assert err.retryable is True and err.http_status == 507
    body = err.to_dict()
    assert body["code"] == "RUNTIME_GPU_OOM" and body["details"] == {"step": 3}
    assert "batch" in body["hint"]
    assert BackpropError("CONFIG_INVALID").message == CATALOG[ErrorCode.CONFIG_INVALID].title
