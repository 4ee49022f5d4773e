"""bitvit's app: a Gradio page that runs a full-precision and a quantized ViT side by side.

`python app/main.py` serves it; `python -m app.bench` measures its frame rate. Modules: `backends`
(model files -> runnable backends, torch or ONNX Runtime), `frames` (any frame -> the models' input),
`live` (both models on one frame, sliding-window statistics), `results` (plots from
`assets/results/*.json`), `examples` (drawn example images), `ui` (the page and its handlers).
"""
