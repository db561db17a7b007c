#!/usr/bin/python3
"""Trained weights and Adam moments for measuring the block codecs.

Trains a small GPT (torch, CPU) on a repetitive synthetic token stream with
AdamW, then writes one torch.save file holding, per parameter:

  bf16/<name>        the weights cast to bf16
  fp32/<name>        the fp32 weights
  exp_avg/<name>     AdamW's first moment (fp32)
  exp_avg_sq/<name>  AdamW's second moment (fp32)

Measure it with the C++ codecs (docs/architecture.md, "Block codecs"):

  /usr/bin/python3 tools/codec_measure.py --out /tmp/gpt.pt
  build/bin/ckptkv import --db /tmp/gpt-store /tmp/gpt.pt --tag gpt
  build/bin/ckptkv codec-stats --db /tmp/gpt-store --tag gpt

Debian's /usr/bin/python3 with torch 1.13 (generic BLAS, about 2 GFLOP/s per
core here, hence the small defaults); about a minute on 2 cores.
"""
import argparse
import math
import time

import torch
import torch.nn as nn
import torch.nn.functional as F


class Block(nn.Module):
    def __init__(self, d, heads):
        super().__init__()
        self.ln1 = nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.ln2 = nn.LayerNorm(d)
        self.fc = nn.Linear(d, 4 * d)
        self.out = nn.Linear(4 * d, d)
        self.heads = heads

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(d, dim=2)
        shape = (b, t, self.heads, d // self.heads)
        q, k, v = (z.view(shape).transpose(1, 2) for z in (q, k, v))
        att = (q @ k.transpose(-2, -1)) / math.sqrt(d // self.heads)
        mask = torch.ones(t, t, dtype=torch.bool).tril()
        att = att.masked_fill(~mask, float("-inf")).softmax(-1)
        y = (att @ v).transpose(1, 2).reshape(b, t, d)
        x = x + self.proj(y)
        return x + self.out(F.gelu(self.fc(self.ln2(x))))


class GPT(nn.Module):
    def __init__(self, vocab, ctx, d, layers, heads):
        super().__init__()
        self.tok = nn.Embedding(vocab, d)
        self.pos = nn.Embedding(ctx, d)
        self.blocks = nn.ModuleList(Block(d, heads) for _ in range(layers))
        self.ln = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab, bias=False)

    def forward(self, idx):
        x = self.tok(idx) + self.pos(torch.arange(idx.shape[1]))
        for b in self.blocks:
            x = b(x)
        return self.head(self.ln(x))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=2048)
    ap.add_argument("--ctx", type=int, default=32)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--steps", type=int, default=120)
    ap.add_argument("--seed", type=int, default=1)
    a = ap.parse_args()
    torch.manual_seed(a.seed)
    torch.set_num_threads(2)
    model = GPT(a.vocab, a.ctx, a.hidden, a.layers, a.heads)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1)
    # A repetitive stream: a random "text" of 4096 tokens from a Zipf-like
    # vocabulary, repeated with noise, so the loss falls.
    ranks = torch.arange(1, a.vocab + 1, dtype=torch.float)
    text = torch.multinomial(1.0 / ranks, 4096, replacement=True)
    start = time.time()
    for step in range(a.steps):
        offs = torch.randint(0, text.numel() - a.ctx - 1, (a.batch,))
        batch = torch.stack([text[o:o + a.ctx + 1] for o in offs])
        noise = torch.rand(batch.shape) < 0.05
        batch = torch.where(noise, torch.randint(0, a.vocab, batch.shape), batch)
        logits = model(batch[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, a.vocab), batch[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 25 == 0 or step == a.steps - 1:
            print(f"step {step} loss {loss.item():.3f} ({time.time() - start:.0f} s)", flush=True)
    out = {}
    for name, p in model.named_parameters():
        st = opt.state[p]
        out["bf16/" + name] = p.detach().to(torch.bfloat16).clone()
        out["fp32/" + name] = p.detach().clone()
        out["exp_avg/" + name] = st["exp_avg"].clone()
        out["exp_avg_sq/" + name] = st["exp_avg_sq"].clone()
    torch.save(out, a.out)
    n = sum(p.numel() for p in model.parameters())
    print(f"wrote {a.out}: {len(out)} tensors, {n} parameters")


if __name__ == "__main__":
    main()
