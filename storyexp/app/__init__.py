"""The browser demo (`task=app`): `model.StoryApp` (the checkpoint's model, streamed sampling, the grid; no Gradio)
and `ui.build_ui` / `ui.launch` (the Gradio page)."""
