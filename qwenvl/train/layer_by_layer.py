"""Forward and backward one decoder layer at a time: one compiled graph per layer structure, whatever the depth.

MindSpore 2.7 compiles the whole model into one graph whose host memory grows with every layer (~14 MiB per
text layer on CPU, `bench/graph_memory.py`), and its cell reuse (`lazy_inline`) is refused on the CPU backend
("CPU does not support the lazy_inline feature"). Here the step runs as separate compiled graphs instead:

1. `model.layer_inputs` (embeddings, vision tower, rotary tables), forward only;
2. each decoder layer forward, keeping only its input;
3. the final norm and loss, with the gradient of the last hidden state;
4. each layer again in reverse, forward and backward (gradient checkpointing: its activations are recomputed),
   giving the gradient of its input and of its weights;
5. `layer_inputs` again, backward from the gradients of the embeddings and deepstack features (skipped when
   nothing before the layers trains, as with LoRA). On a micro-batch without images or video this graph takes
   no vision weights: their gradients are zero, made in their reduced shape (`zeros`) instead of computed whole
   and reduce-scattered (a ZeRO-2 rank's peak at 163 M parameters fell ~200 MiB: BENCHMARKS.md, run D).

Steps 2 and 4 run a copy of the first layer of each structure on every layer's weights: the copy's
Parameters are pointed at the layer's storage (`Parameter.set_data` shares, it does not copy).
Kept between graphs: every layer's input and the gradients so far; the activations of one layer at a time.
The result is the gradient `ms.value_and_grad` of the whole model gives, in the optimizer's parameter order.

LoRA dropout: every layer runs with the first layer's mask salts, so layer i's dropout key is the step's key
mixed with i (deterministic, different per layer, the same in the forward and the recomputed forward); the
masks are therefore not those of the whole-graph step (docs/upstream.md).
"""

from __future__ import annotations

import copy
import inspect
from typing import Callable, Sequence

import mindspore as ms
from mindspore import Parameter, Tensor, nn, ops

from qwenvl.runtime import graph_mode


def _projection(output, gradient):
    """sum(output * gradient) in float32: its gradient with respect to anything is that of `output` fed `gradient`."""
    return (ops.cast(output, ms.float32) * ops.cast(gradient, ms.float32)).sum()


class _LayerForward(nn.Cell):
    def __init__(self, layer: nn.Cell) -> None:
        super().__init__(auto_prefix=False)
        self.layer = layer

    def construct(self, x, *layer_args):
        return self.layer(x, *layer_args)


class _LayerProjection(nn.Cell):
    def __init__(self, layer: nn.Cell) -> None:
        super().__init__(auto_prefix=False)
        self.layer = layer

    def construct(self, x, gradient, *layer_args):
        return _projection(self.layer(x, *layer_args), gradient)


class _Inputs(nn.Cell):
    def __init__(self, model: nn.Cell) -> None:
        super().__init__(auto_prefix=False)
        self.model = model

    def construct(self, *inputs):
        return self.model.layer_inputs(*inputs)


class _InputsProjection(nn.Cell):
    def __init__(self, model: nn.Cell) -> None:
        super().__init__(auto_prefix=False)
        self.model = model

    def construct(self, gradient, deep_gradients, *inputs):
        x, deepstack, _ = self.model.layer_inputs(*inputs)
        total = _projection(x, gradient)
        for feature, feature_gradient in zip(deepstack, deep_gradients):
            total = total + _projection(feature, feature_gradient)
        return total


class _ScaledHeadLoss(nn.Cell):
    def __init__(self, model: nn.Cell) -> None:
        super().__init__(auto_prefix=False)
        self.model = model

    def construct(self, x, scale, labels):
        loss_sum, n_tokens = self.model.loss_after_layers(x, labels)
        return loss_sum * scale, loss_sum, n_tokens


def _parameters(cell: nn.Cell) -> list[Parameter]:
    return list(cell.get_parameters())


def _named(layer: nn.Cell) -> list[tuple[str, Parameter]]:
    """(name inside the layer, parameter), in `_parameters` order."""
    prefix = len(layer.param_prefix) + 1 if getattr(layer, "param_prefix", "") else 0
    return [(name[prefix:], p) for name, p in layer.parameters_and_names()]


def _structure(layer: nn.Cell) -> tuple:
    """What one compiled graph can serve: the cell classes, parameter names, shapes, dtypes and trainability."""
    cells = tuple(type(cell).__name__ for _, cell in layer.cells_and_names())
    names = tuple((name, tuple(p.shape), str(p.dtype), bool(p.requires_grad)) for name, p in _named(layer))
    return cells, names


class _LayerGroup:
    """Layers of one structure, run on the compiled graphs of one copy of the first, pointed at each one's weights.

    The copy's Parameters are its own objects, so the layers' Parameters never change; pointing them with
    `set_data` shares storage (no copy). (Pointing a real layer's Parameters away and back would need a handle
    on their storage, and `Parameter.value()` is an asynchronous load that may read the storage swapped in.)
    """

    def __init__(self, layers: Sequence[nn.Cell]) -> None:
        self.template = copy.deepcopy(layers[0])
        self.params = _parameters(self.template)
        self.trainable = [p for p in self.params if p.requires_grad]
        self.forward = ms.jit(_LayerForward(self.template))
        self.backward = ms.jit(ms.value_and_grad(_LayerProjection(self.template), 0, self.trainable or None))
        self.loaded: nn.Cell | None = None  # within a step: the layer whose weights the copy points at

    def load(self, layer: nn.Cell) -> None:
        if self.template.training != layer.training:  # dropout follows the model's train / eval mode
            self.template.set_train(layer.training)
        if layer is self.loaded:  # the last layer's forward pass is followed by its backward pass
            return
        for param, source in zip(self.params, _parameters(layer)):
            param.set_data(source)
        self.loaded = layer


Reduce = Callable[[Sequence[int], list[Tensor]], list[Tensor]]
VISION_INPUTS = ("pixel_values", "pixel_values_videos")


class LayerByLayer:
    """`(scale, *inputs) -> ((loss_sum * scale, loss_sum, n_tokens), grads)`, the gradients of `parameters`:
    the interface of `ms.jit(ms.value_and_grad(scaled loss, None, parameters, has_aux=True))` in `TrainStep`.

    `reduce(positions, grads)`, if given, takes each stage's gradients as soon as they exist (positions in
    `parameters`) and returns what to keep instead: ZeRO-2/3 reduce-scatter them there (`ZeroPartition.reduce_part`),
    so a rank holds one layer's whole gradients at a time, not the model's. `zeros(positions)`: what `reduce`
    returns for gradients that are zero on every rank (`ZeroPartition.zero_part`; whole zeros by default), given
    to the vision weights on micro-batches without vision input. With `reduce` collective, ranks must agree which
    micro-batches those are (`qwenvl.parallel.zero3.align_vision`).
    """

    def __init__(self, model: nn.Cell, parameters: Sequence[Parameter], reduce: Reduce | None = None,
                 zeros: Callable[[Sequence[int]], list[Tensor]] | None = None) -> None:  # fmt: skip
        if not hasattr(model, "layer_inputs"):
            name = type(model).__name__
            raise ValueError(f"layer-by-layer execution needs a model with `layer_inputs`; {name} has none")
        self.model = model
        self.parameters = list(parameters)
        self.reduce = reduce
        self.zeros = zeros or (lambda slots: [ops.zeros(self.parameters[i].shape, self.parameters[i].dtype)
                                              for i in slots])  # fmt: skip
        names = list(inspect.signature(model.construct).parameters)
        self.vision_positions = [names.index(name) for name in VISION_INPUTS if name in names]
        self.layers = list(model.model.language_model.layers)
        self.dropout_key = getattr(model, "dropout_key", None)
        index = {id(p): i for i, p in enumerate(self.parameters)}
        by_structure: dict[tuple, list[nn.Cell]] = {}
        for layer in self.layers:
            by_structure.setdefault(_structure(layer), []).append(layer)
        groups = {key: _LayerGroup(layers) for key, layers in by_structure.items()}
        self.group_of = [groups[_structure(layer)] for layer in self.layers]
        # per layer: each trainable parameter's position in `parameters`
        self.slots = [[index[id(p)] for p in _parameters(layer) if p.requires_grad] for layer in self.layers]
        self.head_slots = [index[id(p)] for p in self._trainable((model.model.language_model.norm, model.lm_head))]
        in_layers = {i for slots in self.slots for i in slots}
        in_model = {id(p) for p in _parameters(model.model)}
        # a tied lm_head is the embedding table: in both stages, its two gradients added
        self.input_slots = [i for i, p in enumerate(self.parameters) if i not in in_layers and id(p) in in_model]
        taken = in_layers | set(self.head_slots) | set(self.input_slots)
        stray = [p.name for i, p in enumerate(self.parameters) if i not in taken]
        if stray:
            raise ValueError(f"layer-by-layer execution: trained parameters outside every stage: {stray[:5]}")
        self.vision_slots = [i for i in self.input_slots if self.parameters[i].name.startswith("model.visual.")]
        self.text_input_slots = [i for i in self.input_slots if i not in self.vision_slots]
        head_weights = [self.parameters[i] for i in self.head_slots]
        self.inputs_forward = ms.jit(_Inputs(model))
        self.inputs_backward = self._inputs_backward(model, self.input_slots)
        self.text_inputs_backward = (
            self._inputs_backward(model, self.text_input_slots) if self.vision_slots else self.inputs_backward
        )
        self.head = ms.jit(ms.value_and_grad(_ScaledHeadLoss(model), 0, head_weights or None, has_aux=True))

    def _inputs_backward(self, model: nn.Cell, slots: Sequence[int]) -> Callable | None:
        weights = [self.parameters[i] for i in slots]
        return ms.jit(ms.value_and_grad(_InputsProjection(model), None, weights)) if weights else None

    def has_vision(self, inputs: Sequence[Tensor | None]) -> bool:
        """Whether the micro-batch (positional inputs) runs the vision tower."""
        return any(i < len(inputs) and inputs[i] is not None for i in self.vision_positions)

    def describe(self) -> str:
        kinds = len({id(group) for group in self.group_of})
        return f"{len(self.layers)} decoder layers on {kinds} compiled layer graph{'s' if kinds > 1 else ''}"

    @staticmethod
    def _trainable(cells: Sequence[nn.Cell]) -> list[Parameter]:
        seen, out = set(), []
        for cell in cells:
            for p in _parameters(cell):
                if p.requires_grad and id(p) not in seen:
                    seen.add(id(p))
                    out.append(p)
        return out

    def __call__(self, scale: Tensor, *inputs: Tensor | None):
        # in PyNative mode a compiled graph keeps reading the storage its Parameters had when it first ran
        with graph_mode():
            try:
                return self._step(scale, inputs)
            finally:
                self._set_layer_key(None)
                for group in self.group_of:  # a checkpoint load may replace a layer's storage before the next step
                    group.loaded = None

    def _step(self, scale: Tensor, inputs: tuple):
        grads: list[Tensor | None] = [None] * len(self.parameters)
        x, deepstack, layer_args = self.inputs_forward(*inputs)
        kept = []
        for i, layer in enumerate(self.layers):
            kept.append(x)
            x = self._run(i, layer, lambda group: group.forward(x, *layer_args))
            if i < len(deepstack):
                x = x + deepstack[i]
        head_out, gradient = self._stage_backward(grads, self.head_slots, lambda: self.head(x, scale, inputs[1]))
        deep_gradients = [None] * len(deepstack)
        for i in reversed(range(len(self.layers))):
            if i < len(deepstack):
                deep_gradients[i] = gradient  # the add after layer i passes its gradient to the feature unchanged
            layer_input, incoming = kept[i], gradient
            _, gradient = self._stage_backward(grads, self.slots[i], lambda: self._run(
                i, self.layers[i], lambda group: group.backward(layer_input, incoming, *layer_args)))
            kept[i] = None
        vision = self.has_vision(inputs)
        slots = self.input_slots if vision else self.text_input_slots
        backward = self.inputs_backward if vision else self.text_inputs_backward
        if backward is not None:
            _, input_grads = backward(gradient, tuple(deep_gradients), *inputs)
            self._add(grads, slots, input_grads)
        if not vision:
            for slot, zero in zip(self.vision_slots, self.zeros(self.vision_slots)):
                grads[slot] = zero
        missing = [self.parameters[i].name for i, g in enumerate(grads) if g is None]
        if missing:
            raise AssertionError(f"no gradient for {missing[:5]}")
        return head_out, tuple(grads)

    def _stage_backward(self, grads: list, slots: Sequence[int], backward: Callable) -> tuple:
        """(value, input gradient) of one stage's `value_and_grad` call, its weight gradients added to `grads`.
        A function of its own so that the stage's whole weight gradients are released when it returns: kept alive
        through the next stage's backward pass, they left the memory pool unable to reuse their place for the
        next layer's (a ZeRO-2 rank at 163 M parameters peaked ~80 MiB higher; BENCHMARKS.md)."""
        value, result = backward()
        gradient, weight_grads = self._split(result, bool(slots))
        self._add(grads, slots, weight_grads)
        return value, gradient

    def _run(self, i: int, layer: nn.Cell, call):
        group = self.group_of[i]
        group.load(layer)
        self._set_layer_key(i)
        return call(group)

    @staticmethod
    def _split(result, has_weights: bool) -> tuple[Tensor, Sequence[Tensor]]:
        """`value_and_grad` with an input position gives (input grad, weight grads), or the input grad alone."""
        return (result[0], result[1]) if has_weights else (result, ())

    def _add(self, grads: list, slots: Sequence[int], values: Sequence[Tensor]) -> None:
        """Add one stage's gradients, passed through `reduce` first (each contribution of a parameter used in two
        stages, the tied embedding, separately: the reduction is a sum over ranks, so that is the same sum)."""
        if self.reduce is not None:
            values = self.reduce(slots, list(values))
        for slot, value in zip(slots, values):
            grads[slot] = value if grads[slot] is None else grads[slot] + value

    def _set_layer_key(self, layer: int | None) -> None:
        """Layer i's LoRA dropout key (`DropoutKey.set_layer`; the module docstring); None: the step's."""
        if self.dropout_key is not None:
            self.dropout_key.set_layer(layer)
