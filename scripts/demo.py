"""A tiny forward/backward/EMA demo: a few KoLeo-proto iBOT steps on random crops, then a prototype report."""

from __future__ import annotations

import argparse
import json

import torch

from hf_koleo import KoLeoDinoConfig, KoLeoDinoForPreTraining, prototype_report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--output_dir", default="outputs/demo")
    arguments = parser.parse_args()
    torch.manual_seed(0)
    config = KoLeoDinoConfig(
        backbone_config={
            "model_type": "dinov2",
            "hidden_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "image_size": 32,
            "patch_size": 8,
        },
        num_prototypes=512,
        head_hidden_size=128,
        head_bottleneck_size=32,
        ibot_loss_weight=1.0,
        koleo_proto_weight=0.1,
    )
    model = KoLeoDinoForPreTraining(config).train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    for step in range(arguments.steps):
        global_crops, local_crops = torch.randn(8, 2, 3, 32, 32), torch.randn(8, 4, 3, 16, 16)
        masks = torch.rand(8, 2, 16) < 0.3
        output = model(global_crops, local_crops, masks=masks, teacher_temperature=0.04)
        optimizer.zero_grad()
        output.loss.backward()
        optimizer.step()
        model.update_teacher(0.996)
        terms = {
            name: round(output[name].item(), 4)
            for name in ("loss", "dino_loss", "ibot_loss", "koleo_proto_loss", "koleo_loss")
        }
        print(f"step {step}: {terms}")
    model.save_pretrained(arguments.output_dir)
    report = prototype_report(arguments.output_dir, pixel_values=torch.randn(64, 3, 32, 32))
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
