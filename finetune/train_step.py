"""One training step (forward, backward, gradient clipping, optimizer step), eager or replayed from a CUDA graph.

    from kimi_linear_finetune.train_step import TrainStep
    step = TrainStep(model, opt, max_grad_norm=1.0, cuda_graph=True)
    for batch in batches:                       # dicts of input_ids, labels (and attention_mask / position_ids)
        loss, grad_norm = step(batch)           # device tensors, after the optimizer step
        sched.step()                            # an lr schedule reaches the graph (the lr is a device tensor)

Why: a LoRA step of the bench_1b model issues about 1,700 kernel launches from Python. On the lent H100 hosts the
host took longer to issue them than the GPU took to run them (0.127 s of host time against 0.074 s of kernel time a
step, benchmarks/results/lora_train.json), so the step ran at the host's speed. Captured once in a CUDA graph, a
step is one launch and runs at the GPU's.

What is captured: the forward, backward, clipping and optimizer step of one batch shape, for batches whose every
position is a real token (no padding, no packed documents: their sequence offsets are read on the host during the
forward, which a graph cannot replay). The first batch of that shape runs eagerly (kernels compile and tune on the
way, which a capture cannot do), the second is captured and replayed, later ones are replayed; any other batch runs
eagerly, with the same result. A capture that fails warns once, with the reason, and every later step runs eagerly.
The optimizer is made capturable in place (its step counts and learning rates become device tensors; a scheduler
keeps working, it fills the lr tensor). One CUDA device, one process: under accelerate or FSDP steps run eagerly.
"""

import traceback
import warnings

import torch


def _model_inputs(batch):
    """The batch's tensors as the model takes them; an all-ones attention_mask is left out (nothing to drop, and
    the model would read it on the host to find that out)."""
    inputs = dict(batch)
    mask = inputs.get("attention_mask")
    if mask is not None and not mask.is_cuda and bool(mask.all()):
        del inputs["attention_mask"]
    return inputs


def why_not_graphed(batch):
    """None when the batch can be replayed from a CUDA graph, else the reason (a short phrase)."""
    extra = set(batch) - {"input_ids", "labels", "attention_mask"}
    if extra:
        return f"{', '.join(sorted(extra))} in the batch (packed documents)"
    mask = batch.get("attention_mask")
    if mask is not None:
        if mask.is_cuda:
            return "the attention_mask is on the device (pass batches on the host)"
        if not bool(mask.all()):
            return "padding in the batch"
    return None


def make_capturable(opt, device):
    """Turn an optimizer's groups capturable in place: step counts on the device, the lr a device tensor (a schedule
    fills it, so the value reaches a captured step). Adam and AdamW (torch's) only."""
    if not isinstance(opt, torch.optim.Adam | torch.optim.AdamW):
        raise TypeError(f"CUDA graph steps take torch.optim.Adam or AdamW, not {type(opt).__name__}; "
                        "pass cuda_graph=False for another optimizer")  # fmt: skip
    for group in opt.param_groups:
        if group.get("fused"):
            raise ValueError("CUDA graph steps need a foreach optimizer (fused=False)")
        group["capturable"] = True
        lr = group["lr"]
        if not (isinstance(lr, torch.Tensor) and lr.device == device):
            group["lr"] = torch.tensor(float(lr), dtype=torch.float32, device=device)
        for p in group["params"]:
            state = opt.state.get(p, {})
            if "step" in state and state["step"].device != device:
                state["step"] = state["step"].to(device=device, dtype=torch.float32)


class TrainStep:
    """Calls take a batch (a dict of tensors on the host, as the collate functions build them) and return
    (loss, grad_norm) as device tensors after the optimizer step; grad_norm is None without clipping
    (max_grad_norm None). cuda_graph: replay steps from a CUDA graph where they can be (module docstring).
    `replayed` and `eager` count the steps of each kind; `graph_error` says why a capture failed."""

    def __init__(self, model, opt, max_grad_norm=None, cuda_graph=False):
        self.model, self.opt = model, opt
        self.params = [p for group in opt.param_groups for p in group["params"]]
        self.clip = max_grad_norm
        self.device = self.params[0].device
        self.cuda_graph = bool(cuda_graph)
        if self.cuda_graph:
            if self.device.type != "cuda":
                raise ValueError(f"CUDA graph steps need the model on a CUDA device (it is on {self.device}); "
                                 "pass cuda_graph=False")  # fmt: skip
            make_capturable(opt, self.device)
            self.stream = torch.cuda.Stream(self.device)
        self.shape = None  # the batch shape of the graph: its first batch warms up, the next one is captured
        self.graph = None
        self.static = None  # the tensors the graph reads its batch from
        self.out = None  # (loss, grad_norm) the graph writes
        self.graph_error = None
        self.replayed = self.eager = 0

    def __call__(self, batch):
        inputs = _model_inputs(batch)
        if not self.cuda_graph or self.graph_error is not None or why_not_graphed(batch) is not None:
            return self._eager(inputs)
        shape = tuple(inputs["input_ids"].shape)
        if self.shape is None:  # warm up on the stream the capture will use
            self.shape = shape
            self.stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(self.stream):
                out = self._eager(inputs)
            torch.cuda.current_stream(self.device).wait_stream(self.stream)
            return out
        if shape != self.shape or (self.static is not None and set(inputs) != set(self.static)):
            return self._eager(inputs)
        if self.graph is None:
            try:
                self._capture(inputs)
            except Exception as e:  # noqa: BLE001 - any failure leaves eager steps, which are always right
                self._abandon(e)
            if self.graph is None:  # outside the handler: the failed capture's tensors are gone by now
                return self._eager(inputs)
        return self._replay(inputs)

    def _eager(self, inputs):
        self.opt.zero_grad(set_to_none=True)  # the graph's gradients stay bound after a replay
        loss, norm = self._step({k: v.to(self.device, non_blocking=True) for k, v in inputs.items()})
        self.opt.zero_grad(set_to_none=True)
        self.eager += 1
        return loss, norm

    def _step(self, inputs):
        loss = self.model(**inputs, use_cache=False).loss
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(self.params, self.clip) if self.clip is not None else None
        self.opt.step()
        return loss.detach(), norm

    def _capture(self, inputs):
        self.static = {k: v.to(self.device) for k, v in inputs.items()}
        self.opt.zero_grad(set_to_none=True)  # the capture's backward allocates the gradients it then rewrites
        graph = torch.cuda.CUDAGraph()
        self.stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.graph(graph, stream=self.stream):
            self.out = self._step(self.static)
        torch.cuda.current_stream(self.device).wait_stream(self.stream)
        self.graph = graph

    def _replay(self, inputs):
        for k, v in inputs.items():
            self.static[k].copy_(v.pin_memory() if not v.is_cuda else v, non_blocking=True)
        self.graph.replay()
        self.replayed += 1
        return self.out

    def _abandon(self, error):
        self.graph, self.static, self.out = None, None, None
        self.graph_error = f"{type(error).__name__}: {str(error).splitlines()[0]}{_where(error)}"
        self.opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize(self.device)
        warnings.warn(
            f"CUDA graph capture failed, every step runs eagerly (correct, slower): {self.graph_error}. A step "
            "that reads a device value on the host cannot be replayed (e.g. routed experts run one by one, or a "
            "float32 grouped product on a GPU); pass cuda_graph=False to skip the attempt.",
            stacklevel=3,
        )


def _where(error):
    """' (at file:line in function)' for the innermost frame of the error outside torch, or ''."""
    frames = [f for f in traceback.extract_tb(error.__traceback__) if "/torch/" not in f.filename]
    if not frames:
        return ""
    f = frames[-1]
    return f" (at {f.filename.rsplit('/', 1)[-1]}:{f.lineno} in {f.name})"
