"""Orbax checkpoints: the last K steps and the best by an eval metric, async, resumable.

A checkpoint holds the train state and the data iterator's state, so a resumed run sees
exactly the batches it would have seen. Restoring takes an abstract state whose
shardings belong to the *current* mesh, so a run may resume on a different mesh.
"""

import os

import jax
import orbax.checkpoint as ocp


def abstract_with_shardings(tree, shardings):
    return jax.tree_util.tree_map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


class Checkpoints:
    """`<workdir>/checkpoints` keeps the last `keep` steps; `<workdir>/best` the best one."""

    def __init__(self, workdir, train_cfg):
        self.best_metric = train_cfg.best_metric
        self.latest = ocp.CheckpointManager(
            os.path.join(os.path.abspath(workdir), "checkpoints"),
            options=ocp.CheckpointManagerOptions(
                max_to_keep=train_cfg.keep_checkpoints, enable_async_checkpointing=True,
                create=True),
            item_names=("state", "data"),
        )
        self.best = ocp.CheckpointManager(
            os.path.join(os.path.abspath(workdir), "best"),
            options=ocp.CheckpointManagerOptions(
                max_to_keep=1, best_fn=lambda m: m[self.best_metric],
                best_mode=train_cfg.best_mode, enable_async_checkpointing=True, create=True),
            item_names=("state", "data"),
        )

    @staticmethod
    def _save_args(state, data_state):
        return ocp.args.Composite(
            state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state))

    def save(self, step, state, data_state, *, force=False):
        if self.latest.latest_step() == step:
            return False
        return self.latest.save(step, args=self._save_args(state, data_state), force=force)

    def save_best(self, step, state, data_state, metrics):
        if self.best_metric not in metrics:
            raise KeyError(
                f"config.train.best_metric={self.best_metric!r} is not among the eval "
                f"metrics {sorted(metrics)}")
        return self.best.save(step, args=self._save_args(state, data_state),
                              metrics={k: float(v) for k, v in metrics.items()})

    def latest_step(self):
        return self.latest.latest_step()

    def restore(self, abstract_state, step=None, manager=None):
        """-> (state, data_state) at `step` (default: the latest), onto the current mesh."""
        manager = manager or self.latest
        step = manager.latest_step() if step is None else step
        restored = manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()))
        return restored.state, restored.data

    def reached_preemption(self, step):
        return self.latest.reached_preemption(step)

    def wait(self):
        self.latest.wait_until_finished()
        self.best.wait_until_finished()

    def close(self):
        self.latest.close()
        self.best.close()
