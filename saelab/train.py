"""The trainer: a thin loop over ``sae.loss`` streaming shuffled batches from a store.

Per run: activations are scaled by s so that mean ‖s·x‖ = √d_in (s folded back into the saved
weights, so the saved SAE reads raw activations); init W_enc = enc_init·W_decᵀ (0.3 for the
TopK family, else 1) with unit-norm decoder rows and b_dec at the geometric median of a sample; Adam with LR warm-up and a linear decay over
the last ``lr_decay`` of the run; gradient clipping; decoder constraint and dead-latent counters
through ``sae.after_step``; checkpoints (``saelab.resume``) with weights, optimiser, schedules,
counters and the store iterator's state, so ``--resume`` after kill -9 sees the same batches and
ends at the same step.

Under ``torchrun`` (``saelab.distributed``) the SAE is wrapped in DistributedDataParallel: the
seed fixes one sequence of global batches of ``batch_size`` rows and rank r trains on rows
[r·B/N, (r+1)·B/N) of each, each rank's loss is the mean over its slice and DDP averages the
gradients, so the update is the single-process one (same clipping, same Adam state). Firing
counters (dead latents), BatchTopK's threshold and the relu/jumprelu/gated L0 controller are
all-reduced each step, so every rank holds identical weights and statistics; BatchTopK selects
its k·B/N codes within each rank's slice. Rank 0 alone writes checkpoints, metrics and the
saved SAE.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import pathlib
import time

import torch
from tqdm.auto import tqdm

from saelab import distributed as dist
from saelab import e2e
from saelab import resume as run_state
from saelab.config import CLT, TRANSCODERS, SAEConfig, TrainConfig
from saelab.device import pick_device
from saelab.errors import SaelabError
from saelab.evaluate import check_fvu, evaluate_layers, evaluate_store
from saelab.fs import (atomic_write_text, check_free_space, no_empty_folder_left, out_folder, remove_contents,
                       run_lock)
from saelab.kernels.dispatch import resolve_kernel
from saelab.layout import (
    CHECKPOINT_FILE,
    EVAL_FILE,
    GROUP_FILE,
    METRICS_FILE,
    MFR_FILE,
    TRAIN_FILE,
    check_eval,
    group_json,
)
from saelab.jobs import check_group_resume, clt_config, sae_config_for, training_pairs
from saelab.logger import MetricsLogger
from saelab.sae import SAE, mutual
from saelab.store import ActivationStore, resolve_stores
from saelab.store.stream import PairedBatches


def train(tcfg: TrainConfig, scfg: SAEConfig, resume: bool = False, progress: bool = True) -> dict[str, pathlib.Path]:
    """Train one SAE per selected store; returns {hook: SAE folder}."""
    tcfg.validate()
    scfg.check_numbers()  # the SAE's own rules need its d_in (from the store); its numbers are checked now
    with no_empty_folder_left(tcfg.out):  # a run that fails before writing leaves no empty --out behind
        return _train(tcfg, scfg, resume, progress)


def _train(tcfg: TrainConfig, scfg: SAEConfig, resume: bool, progress: bool) -> dict[str, pathlib.Path]:
    if tcfg.mfr:  # one group of SAEs over one store
        return _train_mfr(tcfg, scfg, resume, progress and dist.is_main())
    if scfg.arch == CLT:  # one model over every pair: its layers
        pairs = training_pairs(tcfg)
        first = pairs[0][0]
        return {ActivationStore(first).hook: train_one(first, pathlib.Path(tcfg.out), tcfg, scfg, resume,
                                                       progress and dist.is_main(), [b for _, b in pairs],
                                                       [a for a, _ in pairs])}
    if scfg.arch in TRANSCODERS:
        jobs = training_pairs(tcfg)
    else:
        jobs = [(path, None) for path in resolve_stores(tcfg.activations, tcfg.hook)]
    out = pathlib.Path(tcfg.out)
    progress = progress and dist.is_main()
    if len(jobs) == 1:
        path, target = jobs[0]
        return {ActivationStore(path).hook: train_one(path, out, tcfg, scfg, resume, progress, target)}
    by_hook: dict[str, tuple] = {}
    for path, target in jobs:
        hook = ActivationStore(path).hook
        if hook in by_hook:
            raise SaelabError(f"stores {by_hook[hook][0]} and {path} both hold hook {hook}, and a group has one SAE "
                              "per hook: pass --activations with one store folder")
        by_hook[hook] = (path, target)
    if resume:
        check_group_resume(out, by_hook)
    else:
        out_folder(out)  # a group folder, as an SAE folder: new or empty
    with run_lock(out) if dist.is_main() else contextlib.nullcontext():
        # --resume of a group continues the SAEs it started and starts the ones it never reached (a run that failed
        # on its second store, fixed, resumes instead of needing a new --out)
        folders = {hook: train_one(path, out / hook, tcfg, scfg,
                                   resume and (out / hook).is_dir() and any((out / hook).iterdir()), progress, target)
                   for hook, (path, target) in by_hook.items()}
        model = ActivationStore(jobs[0][0]).manifest.get("model", "")
        if dist.is_main():
            atomic_write_text(out / GROUP_FILE, group_json(model, folders))
        dist.barrier()
    return folders


def _train_mfr(tcfg: TrainConfig, scfg: SAEConfig, resume: bool, progress: bool) -> dict[str, pathlib.Path]:
    """``--mfr N``: N SAEs of the store's hook trained together into the group folder ``--out``; returns
    {"HOOK [MEMBER]": SAE folder} in member order."""
    if scfg.arch in TRANSCODERS:
        raise SaelabError(f"--mfr trains SAEs on one store, and --arch {scfg.arch} is a transcoder: drop --mfr, or "
                          "pass an SAE architecture")
    paths = resolve_stores(tcfg.activations, tcfg.hook)
    if len(paths) > 1:
        hooks = ", ".join(ActivationStore(p).hook for p in paths[:3])
        raise SaelabError(f"--mfr trains its {tcfg.mfr} SAEs on one store, and {tcfg.activations} holds {len(paths)} "
                          f"({hooks}, ...): pick one with --hook")
    out = pathlib.Path(tcfg.out)
    train_one(paths[0], out, tcfg, scfg, resume, progress, members=tcfg.mfr)
    hook = ActivationStore(paths[0]).hook
    return {f"{hook} [{name}]": out / name for name in (mfr_member(i) for i in range(tcfg.mfr))}


def mfr_member(i: int) -> str:
    """The folder name of an MFR group's member ``i`` (trained from seed --seed + i)."""
    return f"sae-{i}"


def geometric_median(x: torch.Tensor, iters: int = 50, eps: float = 1e-6) -> torch.Tensor:
    """Weiszfeld's algorithm."""
    m = x.mean(0)
    for _ in range(iters):
        w = 1.0 / (x - m).norm(dim=1).clamp_min(eps)
        new = (w[:, None] * x).sum(0) / w.sum()
        if (new - m).norm() < eps * (1 + m.norm()):
            return new
        m = new
    return m


def lr_factor(step: int, total: int, warmup: int, decay: float) -> float:
    warm = min(warmup, max(1, total // 20))
    if step < warm:
        return (step + 1) / warm
    start = int(total * (1 - decay))
    if decay > 0 and step >= start:
        return max(0.0, (total - step) / max(1, total - start))
    return 1.0


@dataclasses.dataclass
class _Run:
    """One SAE's training run, set up: what the loop reads and the end writes."""

    out: pathlib.Path
    store: ActivationStore
    cfg: SAEConfig
    tcfg: TrainConfig
    sae: SAE  # the one SAE, or an MFR group's first member
    opt: torch.optim.Optimizer
    it: object  # the store's BatchIterator
    device: torch.device
    lr: float
    n_steps: int
    total_tokens: int
    skip_bos: bool
    needs_grads: bool
    target: ActivationStore | list | None = None  # a transcoder's: the rows it reconstructs (a CLT's: per layer)
    inputs: list | None = None  # a CLT's input stores, one per layer (``store`` is the first)
    splice: e2e.Splice | None = None  # --objective kl / kl+ds: the model's clean and spliced forwards
    step: int = 0
    scale: float = 1.0
    scale_out: float = 1.0  # the target rows' scale (a transcoder's; an SAE's targets are its inputs)
    members: list = dataclasses.field(default_factory=list)  # every SAE trained: [sae], or an MFR group's N

    @property
    def group(self) -> bool:
        return len(self.members) > 1

    def folder(self, i: int) -> pathlib.Path:
        """Member i's SAE folder: ``out`` itself for one SAE, ``out/sae-i`` in an MFR group."""
        return self.out / mfr_member(i) if self.group else self.out

    def state(self) -> torch.nn.Module:
        """What a checkpoint holds: the SAE, or the group's members as one module list."""
        return torch.nn.ModuleList(self.members) if self.group else self.sae


def train_one(path: pathlib.Path, out: pathlib.Path, tcfg: TrainConfig, scfg: SAEConfig,
              resume: bool = False, progress: bool = True, target=None, inputs: list | None = None,
              members: int = 0) -> pathlib.Path:
    """Train one SAE on the store at ``path`` into the SAE folder ``out`` (``resume``: from its checkpoint); a
    transcoder reconstructs the rows of the ``target`` store (row-aligned with ``path``'s); a cross-layer
    transcoder reads every store of ``inputs`` and reconstructs every one of ``target`` (lists, one per layer).
    ``members`` ≥ 2: an MFR group of that many SAEs into ``out`` (``saelab.sae.mutual``)."""
    store = ActivationStore(path)
    if inputs is not None:
        inputs, target_store = [ActivationStore(p) for p in inputs], [ActivationStore(p) for p in target]
        cfg = clt_config(inputs, target_store, scfg)
    else:
        target_store = ActivationStore(target) if target is not None else None
        cfg = sae_config_for(store, scfg, target_store)
    cls = SAE.registry[cfg.arch]
    wanted = cls.rows_for_init(cfg)
    if wanted > store.n_rows("train") and cls.init_rows_fix:
        raise SaelabError(f"--arch {cfg.arch} reads {wanted:,} training rows before it starts, and the store {path} "
                          f"holds {store.n_rows('train'):,}: {cls.init_rows_fix}")
    world, main = dist.world_size(), dist.is_main()
    if tcfg.objective != "mse":
        _check_e2e(tcfg, cfg, store, world)
    if tcfg.batch_size % world:
        raise SaelabError(f"--batch-size {tcfg.batch_size} does not split evenly over {world} ranks: "
                          f"pass a multiple of {world}")
    device = pick_device(dist.device_for(tcfg.device))
    # what would fail at the first step or at the logger is checked before --out is touched
    resolve_kernel(tcfg.kernel, device)
    if main:
        MetricsLogger.check(tcfg.log)
        store.check_shards("holdout")  # read only at the end, for the final eval: checked before training
        for st in (target_store if isinstance(target_store, list) else [target_store]) + (inputs or [])[1:]:
            if st is not None:
                st.check_shards("holdout")
    if main and not resume:  # a checkpoint (weights + Adam's two moments), its temp copy, and the saved SAE
        weights = cfg.d_sae * (cfg.d_in + cfg.output_dim) * cfg.n_layers ** 2 + cfg.d_in * cfg.d_out  # + W_skip
        check_free_space(out, 7 * 4 * weights * max(1, members), f"training a {cfg.d_sae:,}-latent SAE",
                         "free space, or train to another --out")
    run_state.check_out(out, resume)
    dist.barrier()  # every rank has checked --out before rank 0 writes into it
    with run_lock(out) if main else contextlib.nullcontext():  # one run at a time in an SAE folder
        one_target = None if isinstance(target_store, list) else target_store  # a CLT: its first store is checked
        if resume and (out / TRAIN_FILE).exists() and run_state.check_resumable(out, tcfg, cfg, store,
                                                                                one_target).get("done"):
            return out  # finished earlier
        run = _start(out, store, cfg, tcfg, device, resume, target_store, inputs, max(1, members))
        _fit(run, resume, progress)
        if main:  # rank 0 saves and evaluates; the others wait for it
            _finish(run)
        dist.barrier()
    return out


def _check_e2e(tcfg: TrainConfig, cfg: SAEConfig, store: ActivationStore, world: int) -> None:
    """One-line errors for an end-to-end run this trainer cannot give, before --out is touched."""
    what = f"--objective {tcfg.objective}"
    if cfg.arch in TRANSCODERS or cfg.arch in e2e.NOT_E2E:
        why = ("a transcoder replaces another hook than it reads" if cfg.arch in TRANSCODERS else
               "its loss reads stored gradients" if cfg.arch == "gradient" else "its loss reconstructs at several widths")
        raise SaelabError(f"{what} trains an SAE spliced at the hook it reads, and --arch {cfg.arch} is not one ({why}):"
                          " pass --objective mse, or another architecture")
    if world > 1:
        raise SaelabError(f"{what} runs in one process: drop torchrun / --nproc")
    e2e.check_store(store, tcfg.objective)
    ctx = store.context_size
    if tcfg.batch_size % ctx:
        raise SaelabError(f"{what} trains on whole contexts of {ctx} tokens: pass a --batch-size multiple of {ctx}")


def _layer_batches(inputs: list, targets: list, **batches) -> PairedBatches:
    """A CLT's batches: every layer's input and target rows, aligned and stacked ([B, L, d] each)."""
    return PairedBatches([st.batches(**batches) for st in inputs], [st.batches(**batches) for st in targets])


def _start(out, store, cfg, tcfg, device, resume, target=None, inputs=None, n_members: int = 1) -> _Run:
    """The SAE (or an MFR group's ``n_members``), its optimiser and the store's iterator, fresh (scale and b_dec from
    a sample, train.json written) or from the run's checkpoint."""
    rank, world, main = dist.rank(), dist.world_size(), dist.is_main()
    needs_grads = SAE.registry[cfg.arch].needs_grads
    skip_bos = not tcfg.include_bos and store.manifest.get("bos_included", False)
    if tcfg.objective != "mse":  # an epoch of whole contexts
        total_tokens = tcfg.tokens or store.n_rows("train")
    else:
        total_tokens = tcfg.tokens or store.batches(tcfg.batch_size, skip_bos=skip_bos).rows_per_epoch
    n_steps = max(1, total_tokens // tcfg.batch_size)
    total_tokens = n_steps * tcfg.batch_size
    members = []
    for i in reversed(range(n_members)):  # member 0 last: the global generator then stands where one SAE's leaves it
        torch.manual_seed(tcfg.seed + i)
        members.insert(0, SAE.registry[cfg.arch](cfg).to(device))
    for sae in members:
        sae.total_steps = n_steps
        sae.kernel = tcfg.kernel
        sae.dead_after = min(cfg.dead_tokens, store.n_rows("train"))
    sae = members[0]
    lr = tcfg.lr or 2e-4 / math.sqrt(cfg.d_sae / 16384)
    # one Adam over every member: Adam is elementwise, so each member steps as its own optimiser would step it
    # each parameter group at its share of the LR (``SAE.lr_scales``: JumpReLU's thresholds may step faster)
    groups: dict[float, list] = {}
    for m in members:
        scales = m.lr_scales()
        for name, p in m.named_parameters():
            groups.setdefault(scales.get(name, 1.0), []).append(p)
    opt = torch.optim.Adam([{"params": ps, "lr_scale": sc} for sc, ps in groups.items()], lr=lr)
    batches = dict(batch_size=tcfg.batch_size, split="train", tokens=total_tokens, seed=tcfg.seed, skip_bos=skip_bos,
                   device=device, buffer_rows=tcfg.buffer_rows, part=(rank, world))
    splice = None
    if tcfg.objective != "mse":  # whole contexts of the store's text, through the model
        from saelab.models import load_model

        tokens = store.tokens("train")
        model = load_model(tcfg.model or store.manifest["model"], device=str(device))
        if store.hook not in model.hook_dict:
            raise SaelabError(f"--objective {tcfg.objective}: the model {tcfg.model or store.manifest['model']} has no "
                              f"hook {store.hook}: pass --model, the model the store was harvested from")
        for p in model.parameters():
            p.requires_grad_(False)
        it = e2e.ContextBatches(tokens, tcfg.batch_size // store.context_size, n_steps, tcfg.seed, device)
        splice = e2e.Splice(model, store.hook, tcfg.objective, 1 if skip_bos else 0, tcfg.kl_coeff, tcfg.ds_coeff)
    elif inputs is not None:  # a CLT: every layer's stores, stacked
        it = _layer_batches(inputs, target, **batches)
    else:
        it = store.batches(with_grads=needs_grads, **batches)
        if target is not None:  # the same settings over the aligned store: the same rows, in the same order
            it = PairedBatches(it, target.batches(**batches))
    run = _Run(out, store, cfg, tcfg, sae, opt, it, device, lr, n_steps, total_tokens, skip_bos, needs_grads, target,
               inputs, splice=splice, members=members)
    if resume and (out / CHECKPOINT_FILE).exists():
        run.step, run.scale, run.scale_out = run_state.load_checkpoint(out, run.state(), opt, it, n_steps, cfg.arch,
                                                                       device)
        if main:
            for i in range(n_members):
                run_state.truncate_metrics(run.folder(i) / METRICS_FILE, run.step)
        return run
    if main:
        for i in range(n_members):  # a run killed before its first checkpoint starts over
            run.folder(i).mkdir(parents=True, exist_ok=True)
            run_state.truncate_metrics(run.folder(i) / METRICS_FILE, 0)
    if inputs is not None:  # a CLT scales each layer itself (its buffers); the trainer's scale is 1
        sample = dict(batch_size=min(8192, store.n_rows("train")), split="train", seed=tcfg.seed + 7919,
                      skip_bos=skip_bos, device=device, buffer_rows=tcfg.buffer_rows)
        x, y = next(_layer_batches(inputs, target, **sample))
        sae.init_from_sample(x, y, geometric_median)
        if main:
            run_state.write_run_info(out, tcfg, cfg, store, n_steps, world, 1.0)
        return run
    run.scale, median = _init_stats(store, skip_bos, tcfg.seed, device, buffer_rows=tcfg.buffer_rows)
    run.scale_out = run.scale
    if target is not None:  # b_dec is in the output space: the targets' median, in their own scale
        run.scale_out, median = _init_stats(target, skip_bos, tcfg.seed, device, buffer_rows=tcfg.buffer_rows)
    with torch.no_grad():
        for m in members:
            m.b_dec.copy_(median * run.scale_out)
    wanted = min(sae.rows_for_init(cfg), store.n_rows("train"))  # all of them where fewer may do (init_rows_fix)
    if wanted:  # the same rows on every rank (one seed), in the trainer's scale
        x = next(iter(store.batches(wanted, split="train", seed=tcfg.seed + 104729, skip_bos=skip_bos, device=device,
                                    buffer_rows=max(tcfg.buffer_rows, wanted))))
        for m in members:
            m.init_from_rows((x[0] if isinstance(x, tuple) else x) * run.scale)
    if main:
        run_state.write_run_info(out, tcfg, cfg, store, n_steps, world, run.scale, target, run.scale_out)
        if run.group:  # each member's folder records the group's run, and which member it is
            for i in range(n_members):
                run_state.write_run_info(run.folder(i), tcfg, cfg, store, n_steps, world, run.scale,
                                         extra={"mfr_member": i, "init_seed": tcfg.seed + i})
    return run


def _fit(run: _Run, resume: bool, progress: bool) -> None:
    """The loop: shuffled batches into ``sae.loss``, backward, clip, step; metrics and checkpoints as it goes.
    Under torchrun DDP averages the gradients and the SAE's statistics are reduced in ``after_step``. An MFR group's
    members take the same batches, and one backward of the sum of their losses and the group's penalty; each member
    is clipped, constrained and logged as one SAE is."""
    rank, world, main = dist.rank(), dist.world_size(), dist.is_main()
    opt, tcfg = run.opt, run.tcfg
    model, reduce = _LossModule(run.members, tcfg.mfr_coeff * run.cfg.d_in, run.n_steps, tcfg.mfr_warmup,
                                run.splice), None
    if dist.active():
        model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[run.device.index] if run.device.type == "cuda" else None, **dist.no_buffer_sync())
        reduce = dist.Reduce()
    loggers: list = []
    step = last_ck = run.step
    bar = tqdm(total=run.n_steps, initial=step, unit="step", disable=not progress, dynamic_ncols=True,
               desc=f"train {run.cfg.arch} {run.store.hook}" + (f" ×{len(run.members)} (MFR)" if run.group else ""))
    amp = (torch.autocast(run.device.type, dtype=torch.bfloat16) if tcfg.autocast == "bf16"
           else contextlib.nullcontext())
    t0, tok0 = time.perf_counter(), step * tcfg.batch_size
    for m in run.members:
        m.train()
    try:
        if main:
            loggers = [MetricsLogger(run.folder(i), tcfg.log) for i in range(len(run.members))]
        for batch in run.it:
            kept = None
            if run.splice is not None:  # a batch of contexts: the clean forward gives the rows and what KL needs
                (x, kept), g, y = run.splice.clean(batch), None, None
            else:
                x, g = batch if run.needs_grads else (batch, None)
                x, y = x if run.target is not None else (x, None)  # a transcoder's batch: (inputs, targets)
            x = x * run.scale
            if g is not None:
                g = g / run.scale
            if y is not None:
                y = y * run.scale_out
            for group in opt.param_groups:
                group["lr"] = run.lr * group.get("lr_scale", 1.0) * lr_factor(step, run.n_steps, tcfg.lr_warmup_steps,
                                                                             tcfg.lr_decay)
            stats = (step + 1) % tcfg.log_every == 0 or step + 1 == run.n_steps or bool(tcfg.eval_every) and (
                (step + 1) % tcfg.eval_every == 0)  # a metrics step: the group's MMCS is logged
            with amp:
                res = model(x, step, g, y, kept, run.scale, stats)
            opt.zero_grad(set_to_none=True)
            res["loss"].backward()  # under DDP: returns with the gradients averaged over ranks
            for m in run.members:
                m.remove_parallel_grads()
                if tcfg.grad_clip:  # each member's own norm: a member steps as it would alone
                    torch.nn.utils.clip_grad_norm_(m.parameters(), tcfg.grad_clip)
            opt.step()
            for m, outd in zip(run.members, res["outs"]):
                m.after_step(outd, step, reduce)
            step += 1
            bar.update(1)
            last = step == run.n_steps
            evaluate_now = bool(tcfg.eval_every) and (step % tcfg.eval_every == 0 or last)
            if step % tcfg.log_every == 0 or last or evaluate_now:
                extra = {k: float(v) for k, v in res.items() if k.startswith("mfr_")}
                for i, (m, outd) in enumerate(zip(run.members, res["outs"])):
                    rec = _metrics(m, x if y is None else y, outd, step, tcfg, run.it, t0, tok0, reduce)
                    rec.update(extra)
                    _check_finite(run, step, last_ck, loss=rec["loss"])
                    if main and evaluate_now:
                        rec.update(_heldout(run, m))
                    if main:
                        loggers[i].write(rec)
                    if i == 0:
                        post = dict(tok_s=f"{rec['tokens_per_s']:.0f}", fvu=f"{rec['fvu']:.3f}", l0=f"{rec['l0']:.1f}",
                                    dead=f"{100 * rec['dead_frac']:.1f}%")
                if "mfr_mmcs" in extra:
                    post["mmcs"] = f"{extra['mfr_mmcs']:.3f}"
                bar.set_postfix(post)
            if step % tcfg.checkpoint_every == 0 and not last:
                _check_finite(run, step, last_ck)  # a checkpoint holds good weights only
                if main:
                    run_state.save_checkpoint(run.out, run.state(), opt, run.it, step, run.n_steps, run.scale,
                                              run.cfg.arch, run.scale_out)
                last_ck = step
    except BaseException as e:
        if main and not resume and step == 0:  # a fresh run that never trained a step leaves nothing behind
            for lg in loggers:
                lg.close()
            loggers = []
            remove_contents(run.out)  # check_out found it empty or missing: all in it is this run's
        if dist.active() and dist.lost(e):
            where = f"from the checkpoint at step {last_ck}" if last_ck else "from the start (no checkpoint yet)"
            raise SaelabError(f"rank {rank} of {world}: lost the other ranks at training step {step} of "
                              f"{run.n_steps} ({dist.short(e)}); rerun the same command with --resume to continue "
                              f"{where}") from None
        raise
    finally:
        bar.close()
        for lg in loggers:
            lg.close()
    run.step = step


def _check_finite(run: _Run, step: int, last_ck: int, loss: float | None = None) -> None:
    """Divergence is an error, not a result: a non-finite loss or weight stops the run here, before it reaches a
    checkpoint, the saved SAE or eval.json, with a one-line error naming the step and what to change. It runs at
    every metrics step (the last step is one) and before every checkpoint."""
    bad = None
    if loss is not None and not math.isfinite(loss):
        bad = f"the loss is {loss}"
    elif not all(bool(torch.isfinite(p).all()) for m in run.members for p in m.parameters()):
        bad = "the weights hold NaN or inf"
    if bad is None:
        return
    resume = (f"--resume continues from the checkpoint at step {last_ck} (on the same batches)" if last_ck
              else "no checkpoint was written yet")
    raise SaelabError(f"training diverged at step {step} of {run.n_steps} ({bad}): train to a new --out with a lower "
                      f"--lr (this run: {run.lr:.3g}) or --grad-clip, or check the store for NaN/inf rows; {resume}")


def _finish(run: _Run) -> None:
    """Save each SAE trained as an SAE that reads raw activations (the scale folded into a copy), evaluate it, mark
    the run done; an MFR group also writes its mfr.json (the members and their final MMCS). The optimiser's state
    (2× the weights) is freed first and the copy gets no random init, so the end of a run needs no more memory or
    time than a step."""
    run.opt = None
    for i, sae in enumerate(run.members):
        sae.zero_grad(set_to_none=True)
        sae.eval()
        _save(run, sae, run.folder(i))
    if run.group:
        decoders = [m.W_dec.detach() for m in run.members]
        meta = {"model": run.store.manifest.get("model", ""), "hook": run.store.hook, "arch": run.cfg.arch,
                "members": [mfr_member(i) for i in range(len(run.members))], "coeff": run.tcfg.mfr_coeff,
                "mmcs": mutual.pair_mmcs(decoders)}
        atomic_write_text(run.out / MFR_FILE, json.dumps(meta, indent=2) + "\n")
    run_state.mark_done(run.out, run.it.epochs)


def _save(run: _Run, sae: SAE, out: pathlib.Path) -> None:
    """One trained SAE into the SAE folder ``out``: weights (the scale folded in), eval.json, its run marked done."""
    final = SAE.blank(run.cfg)
    final.load_state_dict(sae.state_dict())
    final.fold_input_scale(run.scale, run.scale_out if run.target is not None else None)
    final.cpu().save(out)
    if run.inputs is not None:
        ev = evaluate_layers(final, run.inputs, run.target, skip_bos=run.skip_bos, device=run.device)
    else:
        ev = evaluate_store(final, run.store, skip_bos=run.skip_bos, device=run.device, target=run.target)
    ev = check_fvu(ev, final, run.store, out)
    ev.update(epochs=round(run.it.epochs, 4), steps=run.n_steps, tokens=run.total_tokens)
    atomic_write_text(out / EVAL_FILE, json.dumps(check_eval(ev, out / EVAL_FILE), indent=2) + "\n")
    if out != run.out:  # a group's member: its own train.json says it is done (the group's, at the end)
        run_state.mark_done(out, run.it.epochs)


class _LossModule(torch.nn.Module):
    """The members' ``sae.loss`` as one module's forward, so DistributedDataParallel can wrap it: {"loss": the sum of
    the members' losses (+ an MFR group's penalty, weighted), "outs": each member's loss dict, and an MFR group's
    "mfr_penalty" (1 − mean MMCS) and "mfr_mmcs"}."""

    def __init__(self, members, coeff: float = 0.0, n_steps: int = 1, warmup: float = 0.0, splice=None):
        super().__init__()
        self.members = torch.nn.ModuleList(members)
        self.coeff, self.n_steps, self.warmup, self.splice = coeff, n_steps, warmup, splice

    def forward(self, x, step, grads=None, target=None, kept=None, scale: float = 1.0, stats: bool = True):
        # an SAE's loss takes no target
        outs = [m.loss(x, step=step, grads=grads) if target is None else m.loss(x, step=step, grads=grads,
                                                                                 target=target)
                for m in self.members]
        if self.splice is not None:  # end to end: the spliced model's terms replace the reconstruction's
            out = outs[0]
            terms = self.splice.loss(out["x_hat"] / scale, kept)
            out["loss"] = out["loss"] - out["mse"] + terms["kl_term"] + terms.get("ds_term", 0.0)
            out.update({k: v.detach() for k, v in terms.items()})
        res = {"loss": outs[0]["loss"] if len(outs) == 1 else torch.stack([o["loss"] for o in outs]).sum(),
               "outs": outs}
        weight = self.coeff * mutual.warmup(step, self.n_steps, self.warmup) if len(outs) > 1 else 0.0
        if weight or (len(outs) > 1 and stats):  # d_sae² · d_in a pair: only where it is trained on or logged
            # W_dec read after the losses: archetypal's dictionary is built in its loss
            with contextlib.nullcontext() if weight else torch.no_grad():
                pen = mutual.penalty([m.W_dec for m in self.members])
            if weight:
                res["loss"] = res["loss"] + weight * pen
            res.update(mfr_penalty=pen.detach(), mfr_mmcs=1 - pen.detach())
        return res


def _init_stats(store, skip_bos, seed, device, n: int = 8192, buffer_rows: int = 1 << 18) -> tuple[float, torch.Tensor]:
    """Scale s with mean ‖s·x‖ = √d_in, and the geometric median of a sample of rows."""
    it = store.batches(min(n, store.n_rows("train")), split="train", seed=seed + 7919, skip_bos=skip_bos,
                       device=device, buffer_rows=buffer_rows)
    x = next(iter(it))
    if isinstance(x, tuple):
        x = x[0]
    mean_norm = float(x.norm(dim=1).mean())
    if not math.isfinite(mean_norm) or mean_norm == 0:
        raise SaelabError(f"store {store.path} holds zero or non-finite activations: harvest it again")
    return math.sqrt(store.d_in) / mean_norm, geometric_median(x)


@torch.no_grad()
def _metrics(sae, x, outd, step, tcfg, it, t0, tok0, reduce=None) -> dict:
    """The step's metrics (under DDP: each averaged over the ranks' slices); ``x``: the rows x_hat reconstructs
    (a transcoder's targets)."""
    x_hat = outd["x_hat"].float()
    fvu = float((x - x_hat).pow(2).sum() / (x - x.mean(0)).pow(2).sum().clamp_min(1e-12))
    dt = time.perf_counter() - t0
    rec = {"step": step, "tokens": step * tcfg.batch_size, "epochs": round(it.epochs, 4), "fvu": fvu,
           "l0": float(sae.code_stats(outd)[2]), "dead_frac": float(sae.dead_mask().float().mean()),
           "tokens_per_s": (step * tcfg.batch_size - tok0) / max(dt, 1e-9)}
    rec.update({k: float(v) for k, v in outd.items() if k not in ("f", "x_hat", "codes", "sparse")})
    if reduce is not None:
        keys = [k for k in rec if k not in ("step", "tokens", "epochs", "tokens_per_s", "dead_frac")]
        avg = reduce.mean(torch.tensor([rec[k] for k in keys], dtype=torch.float64, device=x.device))
        rec.update({k: float(v) for k, v in zip(keys, avg.tolist())})
    if sae.control is not None:
        rec["sparsity_coeff"] = sae.control.coeff
    return rec


def _heldout(run: _Run, sae: SAE, n: int = 8192) -> dict:
    """Held-out FVU and L0 of an SAE being trained (in its scaled units), on the first n rows."""
    if not run.store.split_shards("holdout"):
        return {}
    if run.inputs is not None:
        ev = evaluate_layers(sae, run.inputs, run.target, "holdout", run.skip_bos, max_rows=n, device=run.device)
        sae.train()
        return {"heldout_fvu": ev["fvu"], "heldout_l0": ev["l0"]}
    ev = evaluate_store(sae, run.store, "holdout", run.skip_bos, max_rows=n, device=run.device, scale=run.scale,
                        target=run.target, scale_out=run.scale_out)
    sae.train()
    return {"heldout_fvu": ev["fvu"], "heldout_l0": ev["l0"]}
