"""Run under `accelerate launch` with 2 processes: the loss and gradients of 2 processes of batch b with gathered
negatives must equal those of 1 process of batch 2b. Rank 0 writes the comparison to the JSON file in argv[1]."""

import json
import sys

import numpy as np
import torch
from accelerate import Accelerator
from PIL import Image

from modeling_m3el import M3ELModel
from modeling_m3el.tiny import tiny_config, tiny_processor

PER_PROCESS = 3


def build(mode):
    torch.manual_seed(0)
    processor = tiny_processor(words=("river", "bank"))
    model = M3ELModel(tiny_config(processor, cross_modal=mode)).double()
    rng = np.random.default_rng(0)
    count = 2 * PER_PROCESS
    images = [Image.fromarray(rng.integers(0, 256, (24, 24, 3), dtype=np.uint8)) for _ in range(2 * count)]
    batch = processor(
        mentions=[f"mention {i}" for i in range(count)], sentences=[f"river {i} bank" for i in range(count)],
        images=images[:count], entity_names=[f"entity {i}" for i in range(count)],
        entity_descriptions=[f"bank {i}" for i in range(count)], entity_images=images[count:],
    )
    batch["pixel_values"] = batch["pixel_values"].double()
    batch["entity_pixel_values"] = batch["entity_pixel_values"].double()
    return model, batch


def gradients(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def main():
    accelerator = Accelerator()
    results = {}
    for mode in ("text_to_image", "bidirectional"):
        model, batch = build(mode)
        rank = accelerator.process_index
        local = {k: v[rank * PER_PROCESS : (rank + 1) * PER_PROCESS] for k, v in batch.items()}
        wrapped = accelerator.prepare(model)
        output = wrapped(**local, return_loss=True, gather_negatives=True)
        accelerator.backward(output.loss)
        distributed_loss = accelerator.gather(output.loss.detach()[None]).mean().item()
        distributed_grads = gradients(accelerator.unwrap_model(wrapped))
        if accelerator.is_main_process:
            reference, _ = build(mode)
            expected = reference(**batch, return_loss=True)
            expected.loss.backward()
            expected_grads = gradients(reference)
            # Relative to each gradient's scale, floored: the key biases' true gradient is 0 (softmax is invariant to
            # shifting all keys), so both runs hold rounding noise of ~1e-17 there.
            worst = max(
                ((distributed_grads[n] - g).abs().max() / g.abs().max().clamp_min(1e-8)).item()
                for n, g in expected_grads.items()
            )
            results[mode] = {
                "world_size": accelerator.num_processes,
                "logits_shape": list(output.logits.shape),
                "loss_distributed": distributed_loss,
                "loss_single": expected.loss.item(),
                "worst_relative_grad_difference": worst,
                "num_parameters_compared": len(expected_grads),
                "missing": sorted(set(expected_grads) ^ set(distributed_grads)),
            }
        accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        with open(sys.argv[1], "w") as f:
            json.dump(results, f)
    # The process group torn down before exit: left to the interpreter's exit, gloo's teardown once aborted a rank
    # (SIGABRT, "terminate called without an active exception") on a loaded machine.
    accelerator.end_training()


if __name__ == "__main__":
    main()
