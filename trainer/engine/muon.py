"""Muon under ZeRO-1/2 with Newton-Schulz batched over same-shape matrices.

DeepSpeed 0.19's ZeRO-1/2 optimizer computes Muon's update (momentum, Newton-Schulz, aspect-ratio
scale) one matrix at a time while it flattens a rank's gradient partition
(`DeepSpeedZeroOptimizer._get_flat_partition_unpadded`). A transformer has a handful of matrix shapes
(attention projections, the MLP's up and down matrices) repeated in every layer, and both of
DeepSpeed's Newton-Schulz kernels take a batch. `install()` replaces that method with one that computes
the partition's updates per shape, as one stacked batch, with DeepSpeed's own kernels and the same
per-matrix arithmetic (momentum, Nesterov blend, the finite-gradient guard, the scale), and then
flattens them exactly as DeepSpeed does. Batched matmuls may round differently in the last bits.
Everything else (ZeRO-0 and ZeRO-3, offload, per-head or expert matrices, padded partitions) keeps
DeepSpeed's own path.
"""
from collections import defaultdict

import torch

_ORIGINAL = {}


def install() -> None:
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    if "unpadded" not in _ORIGINAL:
        _ORIGINAL["unpadded"] = DeepSpeedZeroOptimizer._get_flat_partition_unpadded
        DeepSpeedZeroOptimizer._get_flat_partition_unpadded = _flat_partition_unpadded


def batched_muon_updates(grads: list, momenta: list, beta: float, ns_method: str, ns_steps: int = 5) -> list:
    """What DeepSpeed's `muon_update(grad, momentum, beta, ns_method=...)` returns for each matrix, with the
    same side effects (momentum updated in place, the gradient turned into the Nesterov blend in place),
    computed one stacked batch per shape and dtype."""
    updates = [None] * len(grads)
    same_shape = defaultdict(list)
    for i, grad in enumerate(grads):
        same_shape[(tuple(grad.shape), grad.dtype)].append(i)
    for members in same_shape.values():
        grad = torch.stack([grads[i] for i in members])
        update, momentum, blend = _stacked(grad.device)(grad, torch.stack([momenta[i] for i in members]), beta,
                                                        ns_method, ns_steps)
        for k, i in enumerate(members):
            momenta[i].copy_(momentum[k])
            grads[i].copy_(blend[k])
            updates[i] = update[k]
    return updates


def _stacked_update(grad, momentum, beta: float, ns_method: str, ns_steps: int):
    from deepspeed.runtime.zero.muon.original_muon import (
        _aspect_ratio_scale,
        zeropower_via_gram_newtonschulz,
        zeropower_via_newtonschulz5,
    )

    # A non-finite gradient leaves its momentum alone and passes through, so the overflow is still seen.
    finite = torch.isfinite(grad).flatten(1).all(dim=1).view(-1, *([1] * (grad.dim() - 1)))
    momentum = torch.where(finite, momentum.lerp(grad, 1 - beta), momentum)
    blend = grad.lerp(momentum, beta)  # Nesterov
    orthogonalize = zeropower_via_gram_newtonschulz if ns_method == "gram" else zeropower_via_newtonschulz5
    update = orthogonalize(blend, steps=ns_steps) * _aspect_ratio_scale(grad.size(-2), grad.size(-1))
    return torch.where(finite, update.to(grad.dtype), blend), momentum, blend


_COMPILED = {}


def _stacked(device: torch.device):
    """`_stacked_update` compiled into one kernel sequence where inductor can work on `device`, else as it is."""
    if device.type not in _COMPILED:
        from trainer.engine.build import compile_blocker

        _COMPILED[device.type] = _stacked_update if compile_blocker(device) else torch.compile(_stacked_update)
    return _COMPILED[device.type]


def _batchable(self, tensor_list) -> bool:
    return self._is_muon_group(tensor_list) and not any(
        getattr(t, "is_expert_group", False) or getattr(t, "muon_num_heads", None) is not None for t in tensor_list)


def _flat_partition_unpadded(self, tensor_list, first_offset, partition_size, dtype, device, param_group_idx,
                             return_tensor_list=False):
    """DeepSpeed's `_get_flat_partition_unpadded`, with a Muon group's updates computed up front, batched."""
    if not _batchable(self, tensor_list):
        return _ORIGINAL["unpadded"](self, tensor_list, first_offset, partition_size, dtype, device, param_group_idx,
                                     return_tensor_list)
    group = self.optimizer.param_groups[param_group_idx]
    self._muon_momentum_buffer(tensor_list, param_group_idx, dtype, device)
    self.groups_lacking_loss_scale.add(param_group_idx)
    # Staged once for the whole partition, as DeepSpeed does: committed only if the step survives.
    staged = self._muon_staging_momentum(group["params"][0], param_group_idx)
    momenta, at = [], 0
    for tensor in tensor_list:
        momenta.append(torch.narrow(staged, 0, at, tensor.numel()).view(tensor.size()))
        at += tensor.numel()
    grads = [self.all_grad_tensors[param_group_idx][i] for i in range(len(tensor_list))]
    updates = batched_muon_updates(grads, momenta, group["momentum"], group.get("ns_method", "gram"))

    flat, current = [], 0  # from here on as DeepSpeed flattens the partition
    for i, tensor in enumerate(updates):
        num_elements, offset = tensor.numel(), 0
        if i == 0 and first_offset > 0:
            offset = first_offset
            num_elements -= offset
        num_elements = min(num_elements, partition_size - current)
        if offset > 0 or num_elements < tensor.numel():
            flat.append(tensor.contiguous().view(-1).narrow(0, int(offset), int(num_elements)))
        else:
            flat.append(tensor)
        current += num_elements
    if current < partition_size:
        flat.append(torch.zeros(int(partition_size - current), dtype=dtype, device=device))
    return flat if return_tensor_list else self.flatten(flat)
