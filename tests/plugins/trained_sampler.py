"""A test sampler plugin (loaded with ``--plugins-dir tests/plugins``) built only on the public interfaces:
one network trained a little more at every iteration on the real training split the host hands it.

``trained-convnet``: ``model`` (default ``convnet3_w32``) built under ``seeded(seed, "trained-init")``,
then at each iteration ``steps`` SGD steps on ``batch`` random real images (rows drawn from
``generator(seed, "trained-batch", iteration, step)``) of the data context's full training split. Its
state (weights, momentum, the last iteration trained) is :class:`~distillkit.interfaces.Stateful`, so
checkpoints hold it. ``record`` names a JSON file the factory writes with what the host handed it.
"""

import json

import torch
import torch.nn.functional as F

from distillkit import hookimpl
from distillkit.models import create_model, embed
from distillkit.seeding import generator, seeded


class TrainedConvNet:
    def __init__(self, spec, seed, device, data, model="convnet3_w32", steps=2, batch=32, lr=0.01,
                 record=None):
        self.seed, self.device, self.data, self.steps, self.batch = seed, device, data, steps, batch
        with seeded(seed, "trained-init"):
            self.net = create_model(model, spec)
        self.net.to(device).train()
        self.optimizer = torch.optim.SGD(self.net.parameters(), lr=lr, momentum=0.9)
        self.trained_to = -1  # the last iteration whose training steps were taken
        if record:
            real = data.train()
            with open(record, "w") as fh:
                json.dump({"root": str(data.root), "dataset": data.dataset.name, "options": data.options,
                           "images": len(real.labels), "classes": sorted(set(real.labels.tolist()))}, fh)

    def extractor(self, iteration):
        if iteration != self.trained_to:  # once per iteration, however often the host asks
            real = self.data.train()
            self.net.requires_grad_(True)
            for step in range(self.steps):
                rows = torch.randint(len(real.labels), (self.batch,),
                                     generator=generator(self.seed, "trained-batch", iteration, step))
                images, labels = real.gather(rows), real.labels[rows].to(self.device)
                self.optimizer.zero_grad(set_to_none=True)
                F.cross_entropy(self.net(images), labels).backward()
                self.optimizer.step()
            self.trained_to = iteration
        self.net.requires_grad_(False)
        net = self.net
        return lambda x: embed(net, x)

    def redraws_at(self, iteration):
        return True

    def state_dict(self):
        return {"net": self.net.state_dict(), "optimizer": self.optimizer.state_dict(),
                "trained_to": self.trained_to}

    def load_state_dict(self, state):
        self.net.load_state_dict(state["net"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.trained_to = int(state["trained_to"])


@hookimpl
def register_samplers(register):
    register("trained-convnet", TrainedConvNet)
