"""Exports: adapter, merged weights and GGUF (own converter, quantization, verification),
Ollama registration, serving and chat. Heavy libraries load inside the functions that need them.
"""

from backpropagate.export.ollama import OllamaClient, render_modelfile
from backpropagate.export.push import push
from backpropagate.export.run_export import ExportResult, export_run
from backpropagate.export.serve import stream_chat

__all__ = ["ExportResult", "OllamaClient", "export_run", "push", "render_modelfile", "stream_chat"]
