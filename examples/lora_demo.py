"""The LoRA life cycle in a minute on any PyTorch model: inject, train, save, reload, merge.

    python examples/lora_demo.py

A small frozen MLP ("pretrained" to fit y = sin(x)) is adapted with LoRA to a shifted target
y = sin(x) + 0.5 cos(3x); then the adapter is saved in peft's format, reloaded into a fresh copy
of the base model and merged into its weights.
"""

import copy
import tempfile

import torch
from torch import nn

import minilora as ml


class MLP(nn.Module):
    def __init__(self, d=64):
        super().__init__()
        self.fc_in, self.fc_mid, self.fc_out = nn.Linear(1, d), nn.Linear(d, d), nn.Linear(d, 1)

    def forward(self, x):
        return self.fc_out(torch.tanh(self.fc_mid(torch.tanh(self.fc_in(x)))))


def fit(model, x, y, steps, lr):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    for _ in range(steps):
        loss = nn.functional.mse_loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        return nn.functional.mse_loss(model(x), y).item()


def main():
    torch.manual_seed(0)
    x = torch.linspace(-3, 3, 256).unsqueeze(1)
    base = MLP()
    print(f"pretrain base on sin(x): mse {fit(base, x, torch.sin(x), 1500, 1e-2):.4f}")

    target = torch.sin(x) + 0.5 * torch.cos(3 * x)
    model = copy.deepcopy(base)
    names = ml.inject(model, ml.LoRAConfig(r=4, alpha=8, targets=["fc_mid", "fc_out"]))
    trainable, total = ml.count_parameters(model)
    print(f"injected LoRA into {names}: {trainable:,} trainable of {total:,} parameters")
    before = nn.functional.mse_loss(model(x), target).item()
    after = fit(model, x, target, 600, 2e-2)
    print(f"LoRA fine-tune on the new target: mse {before:.4f} -> {after:.4f}")

    with tempfile.TemporaryDirectory() as out:
        ml.save_adapter(model, out)
        fresh = copy.deepcopy(base)
        ml.load_adapter(fresh, out)
        reloaded = nn.functional.mse_loss(fresh(x), target).item()
        print(f"saved to {out} (peft format) and reloaded: mse {reloaded:.4f}")
        y = fresh(x)
        ml.merge(fresh)
        print(f"merged: max |change in output| {(fresh(x) - y).abs().max().item():.2e}")
        ml.unmerge(fresh)
        exact = all(torch.equal(fresh.get_submodule(n).weight, base.get_submodule(n).weight) for n in names)
        print(f"unmerged: base weights restored bit for bit: {exact}")
    with ml.disabled(model):
        print(f"adapter disabled: mse {nn.functional.mse_loss(model(x), target).item():.4f} (the base model)")


if __name__ == "__main__":
    main()
