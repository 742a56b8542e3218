"""Host adapter, workflow formats, validation, executor, CLI, media I/O and memory helpers."""
