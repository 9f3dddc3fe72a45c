"""Numbers a restructuring must not change: logits, losses and gradients of the tiny recipes, for one seed.

    python bench/numerics_fingerprint.py --out after.pt          # this tree
    git worktree add /tmp/before <rev> && (cd /tmp/before && python bench/numerics_fingerprint.py --out before.pt)
    python bench/numerics_fingerprint.py --compare before.pt after.pt

Per recipe (full fine-tuning, LoRA on every target with non-zero B, text-only, activation checkpointing) it builds the module the way a run
does (`QMoELightningModule.configure_model` on the embedded default), takes the first 3 training packs of the
embedded data (images and text, several documents per pack), and records for each pack: the full logits, the
summed CE, the aux loss and every trainable parameter's gradient of `ce + coef * n * aux` (what a training step
backpropagates), fp32 on CPU. `--compare` prints, per recipe, the largest absolute difference of each kind and
whether everything is bitwise equal; it exits 1 when a difference exceeds `--tol` (1e-6).

Uses only what both sides of a restructuring have (the module's constructor, `configure_model`, its forward and
the DataModule), so it runs unchanged on an older checkout.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

RECIPES = {
    "full": {},
    "lora": {"lora": {"rank": 4, "alpha": 8, "targets": ["all-linear"], "expert_rank": 2}},
    "text_only": {"text_only": True},
    "checkpointed": {"activation_checkpointing": True},
}


def fingerprint(recipe: dict, packs: int = 3, seed: int = 0) -> dict:
    from data_modules.datamodule import MultimodalPackingDataModule
    from qmoe_lightning.lightning_module import QMoELightningModule

    torch.manual_seed(seed)
    kwargs = dict(recipe)
    if "lora" in kwargs:
        from qmoe_lightning.lora import LoraConfig

        kwargs["lora"] = LoraConfig(**kwargs["lora"])
    module = QMoELightningModule(pretrained="embedded", **kwargs)
    module.configure_model()
    model = module.model.train()
    with torch.no_grad():  # B = 0 at init would hide the adapters from the logits
        for name, p in model.named_parameters():
            if "lora_B" in name or "_lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name))) * 0.02)
    dm = MultimodalPackingDataModule(train_path="embedded", max_tokens=256, pad_to_multiple_of=64, num_workers=0,
                                     seed=0)
    dm.setup("fit")
    out = []
    for p in range(packs):
        batch = dm.train_dataset[p]
        if recipe.get("text_only"):  # the text-only model reads no pixels: its text documents only
            batch = {k: v for k, v in batch.items() if "pixel" not in k and "grid" not in k}
            batch["mm_token_type_ids"] = None
            batch["input_ids"] = batch["input_ids"].clamp(max=model.config.vocab_size - 1)
        model.zero_grad(set_to_none=True)
        res = module(batch, num_items_in_batch=1, return_logits=True, label_logits_only=False)
        coef = module.aux_loss_coef
        loss = res.ce_loss + coef * res.num_label_tokens * res.aux_loss
        loss.backward()
        grads = {n: q.grad.detach().clone() for n, q in model.named_parameters() if q.grad is not None}
        out.append({"logits": res.logits.detach().clone(), "ce": res.ce_loss.detach().clone(),
                    "aux": res.aux_loss.detach().clone(), "grads": grads})
    return out


def compare(before: dict, after: dict, tol: float) -> bool:
    ok = True
    for recipe in before:
        worst = {"logits": 0.0, "ce": 0.0, "aux": 0.0, "grads": 0.0}
        bitwise = True
        for a, b in zip(before[recipe], after[recipe]):
            for kind in ("logits", "ce", "aux"):
                d = (a[kind] - b[kind]).abs().max().item()
                worst[kind] = max(worst[kind], d)
                bitwise &= torch.equal(a[kind], b[kind])
            if set(a["grads"]) != set(b["grads"]):
                print(f"{recipe}: different parameters have gradients: {sorted(set(a['grads']) ^ set(b['grads']))}")
                ok = False
                continue
            for n in a["grads"]:
                worst["grads"] = max(worst["grads"], (a["grads"][n] - b["grads"][n]).abs().max().item())
                bitwise &= torch.equal(a["grads"][n], b["grads"][n])
        bad = max(worst.values()) > tol
        ok &= not bad
        print(f"{recipe:10s} max |diff|: " + ", ".join(f"{k} {v:.3g}" for k, v in worst.items())
              + f"; bitwise {'yes' if bitwise else 'no'}{'  > tol' if bad else ''}")
    return ok


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", help="write this tree's fingerprint here")
    parser.add_argument("--compare", nargs=2, metavar=("BEFORE", "AFTER"))
    parser.add_argument("--tol", type=float, default=1e-6)
    args = parser.parse_args()
    if args.compare:
        before, after = (torch.load(p, weights_only=True) for p in args.compare)  # tensors, dicts, lists only
        sys.exit(0 if compare(before, after, args.tol) else 1)
    if not args.out:
        parser.error("give --out or --compare")
    torch.save({name: fingerprint(recipe) for name, recipe in RECIPES.items()}, args.out)
    print(f"fingerprint of {len(RECIPES)} recipes written to {args.out}")


if __name__ == "__main__":
    main()
