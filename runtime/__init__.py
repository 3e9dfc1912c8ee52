"""The runtime: execute a plan with PyTorch's own distributed APIs and measure it against the prediction.

models (GPT / Llama blocks), parallelize (mesh, TP, FSDP2, recomputation), pipeline (stages and
schedules), data, checkpoint, metrics, report, checks (input validation without torch), train (the
torchrun entry point), launch (starting and following torchrun) and cli (`meshplan run`).
"""
