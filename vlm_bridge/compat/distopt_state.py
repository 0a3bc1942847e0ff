"""Three faults of Megatron-Core 0.16.1's distributed optimizer when it restores a checkpoint into a
torch AdamW (no apex or Transformer Engine):

* it describes what it loads from its current Adam state, which a torch AdamW creates only at its
  first step: :func:`zero_state_to_load_into` puts zeros and step 0 in its place;
* from a "fully_reshardable" checkpoint it copies every key of each parameter's Adam state, "step"
  included, but the checkpoint holds only "param", "exp_avg" and "exp_avg_sq": ``KeyError:
  'step'``. The step count comes with the common state; the copy here leaves keys the checkpoint
  does not hold as they are;
* it gives every parameter's state the same "step" tensor, which AdamW increments in place once
  per parameter: after one resumed update the count is off by the number of parameters, and so
  is every bias correction after it. Each state gets its own copy here.
"""

from __future__ import annotations

import torch

_PATCHED = "_vlm_bridge_keeps_unsaved_keys"


def zero_state_to_load_into(optimizer) -> None:
    """The distributed optimizer describes what it loads from its current Adam state (and its step
    count), which a torch AdamW creates only at its first step: zeros and step 0 in their place,
    each replaced by the checkpoint's values."""
    for inner in getattr(optimizer, "chained_optimizers", [optimizer]):
        adam = getattr(inner, "optimizer", None)
        if adam is None or not hasattr(inner, "_get_model_param_range_map"):  # not distributed
            continue
        moments = getattr(adam, "MOMENT_DTYPE", None)
        for group in adam.param_groups:
            for param in group["params"]:
                state = adam.state[param]
                if not state:
                    state["step"] = torch.tensor(0.0)
                    for key in ("exp_avg", "exp_avg_sq"):
                        state[key] = torch.zeros_like(param, dtype=moments or param.dtype)


def keep_unsaved_optimizer_keys() -> None:
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    original = DistributedOptimizer._set_main_param_and_optimizer_states
    if getattr(original, _PATCHED, False):
        return

    def _set_main_param_and_optimizer_states(self, model_param, tensors):
        if not self.config.use_precision_aware_optimizer_no_fp8_or_ds_fp8:
            group_index, group_order = self.model_param_group_index_map[model_param]
            main_param = self.optimizer.param_groups[group_index]["params"][group_order]
            current = self.optimizer.state[main_param]
            tensors = {**{k: v for k, v in current.items() if k not in tensors}, **tensors}
        return original(self, model_param, tensors)

    load_state_dict = DistributedOptimizer.load_state_dict

    def load_state_dict_with_own_steps(self, state_dict):
        result = load_state_dict(self, state_dict)
        for state in self.optimizer.state.values():
            step = state.get("step")
            if isinstance(step, torch.Tensor):
                state["step"] = step.clone()
        return result

    setattr(_set_main_param_and_optimizer_states, _PATCHED, True)
    DistributedOptimizer._set_main_param_and_optimizer_states = _set_main_param_and_optimizer_states
    DistributedOptimizer.load_state_dict = load_state_dict_with_own_steps
