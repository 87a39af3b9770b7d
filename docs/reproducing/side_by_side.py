"""Run the authors' MEMIT or AlphaEdit (a checkout of jianghoucheng/AlphaEdit, which holds both)
on the records, templates and anchor statistics of an rlsedit run, and compare the two.

    python docs/reproducing/side_by_side.py --code AlphaEdit --run RUN_FOLDER --stats STATS_DIR \
        --out side_by_side.md

RUN_FOLDER: an ``rlsedit run`` of editor=memit or editor=alphaedit with stream.shuffle=false
(it holds config.yaml, context_templates.json and final_maps.safetensors); STATS_DIR:
``rlsedit stats export RUN_FOLDER --out STATS_DIR``. The authors' code is imported as it is; on a
machine without CUDA its hard-coded "cuda" tensors are made on the CPU (``cpu_for_cuda``). Both
codes start from the same model; the report compares the targets z of the first batch, the
change of every edited map after the stream, and each record's outcomes after the stream
(efficacy, generalization, specificity, scored the same way for both).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from pathlib import Path

import torch


@contextlib.contextmanager
def cpu_for_cuda():
    """The authors' "cuda" devices read as the CPU (no GPU here); everything else as it is."""
    def cpu(device):
        if isinstance(device, str) and device.startswith("cuda"):
            return "cpu"
        if isinstance(device, torch.device) and device.type == "cuda":
            return torch.device("cpu")
        return device

    real_to, patched = torch.Tensor.to, {}

    def to(self, *args, **kwargs):
        args = tuple(cpu(a) for a in args)
        if "device" in kwargs:
            kwargs["device"] = cpu(kwargs["device"])
        return real_to(self, *args, **kwargs)

    def factory(fn):
        def make(*args, **kwargs):
            if "device" in kwargs:
                kwargs["device"] = cpu(kwargs["device"])
            return fn(*args, **kwargs)
        return make

    patched[(torch.Tensor, "to")] = real_to
    patched[(torch.Tensor, "cuda")] = torch.Tensor.cuda
    for name in ("zeros", "ones", "tensor", "eye", "arange", "empty", "full", "randn"):
        patched[(torch, name)] = getattr(torch, name)
        setattr(torch, name, factory(getattr(torch, name)))
    torch.Tensor.to = to
    torch.Tensor.cuda = lambda self, *a, **k: self
    try:
        yield
    finally:
        for (owner, name), fn in patched.items():
            setattr(owner, name, fn)


def their_hparams(algo: str, cfg, name: str) -> dict:
    """Our run's settings as the authors' hyper-parameters (their JSON keys)."""
    t, m, e = cfg.editor.target, cfg.model, cfg.editor
    values = dict(model_name=name, layers=list(e.layers), layer_selection="all",
                  fact_token="subject_last", v_num_grad_steps=int(t.steps), v_lr=float(t.lr),
                  v_loss_layer=int(t.loss_layer), v_weight_decay=float(t.weight_decay),
                  clamp_norm_factor=float(t.clamp_norm_factor), kl_factor=float(t.kl_factor),
                  mom2_adjustment=True, rewrite_module_tmp=m.mlp_out_template,
                  layer_module_tmp=m.layer_template,
                  mlp_module_tmp=m.mlp_out_template.rsplit(".", 1)[0],
                  attn_module_tmp=m.layer_template + ".self_attn", ln_f_module=m.ln_f,
                  lm_head_module=m.lm_head, mom2_dataset="rlsedit",
                  mom2_n_samples=int(m.anchor_samples), mom2_dtype="float32")
    if algo == "memit":
        return {**values, "mom2_update_weight": float(e.n_anchor)}
    return {**values, "mom2_update_weight": 0.0, "nullspace_threshold": float(e.threshold),
            "L2": float(e.l2)}


def place_stats(stats: Path, code_stats: Path, name: str, modules: list[str], n: int) -> None:
    """Link the exported files where the authors' layer_stats looks for them."""
    target = code_stats / name / "rlsedit_stats"
    target.mkdir(parents=True, exist_ok=True)
    for module in modules:
        found = list(stats.rglob(f"{module}_float32_mom2_{n}.npz"))
        if not found:
            sys.exit(f"no exported statistics for {module} ({n} samples) under {stats}")
        link = target / found[0].name
        if not link.exists():
            link.symlink_to(found[0].resolve())


def their_side(work: Path) -> None:
    """In the authors' environment: their algorithm over the batches in ``work/inputs.json``;
    the final maps and the first batch's targets to ``work/theirs.safetensors``."""
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    inputs = json.loads((work / "inputs.json").read_text())
    sys.path.insert(0, inputs["code"])
    os.chdir(inputs["code"])  # util/globals.py reads globals.yml from the working folder
    torch.manual_seed(0)
    raw = json.loads((Path(inputs["model"]) / "config.json").read_text())
    rope = raw.get("rope_parameters") or {}  # transformers 5's key; 4.x reads rope_theta
    extra = {"rope_theta": rope["rope_theta"]} if rope.get("rope_type") == "default" else {}
    model = AutoModelForCausalLM.from_pretrained(inputs["model"], torch_dtype=torch.float32,
                                                 **extra)
    model.config._name_or_path = inputs["name"]
    special = json.loads((Path(inputs["model"]) / "tokenizer_config.json").read_text())
    tok = PreTrainedTokenizerFast(  # the same tokenizer.json, whichever transformers wrote it
        tokenizer_file=str(Path(inputs["model"]) / "tokenizer.json"),
        **{k: special[k] for k in ("bos_token", "eos_token", "unk_token", "pad_token")
           if isinstance(special.get(k), str)})
    tok.pad_token = tok.pad_token or tok.eos_token
    tok.padding_side = "right"
    hp, algo, modules = inputs["hparams"], inputs["algo"], inputs["modules"]
    probe = torch.tensor([tok(inputs["probe"])["input_ids"]])
    with torch.no_grad():
        probe_logits = model(probe).logits[0].contiguous()  # the unedited model, their way
    their_z = []
    with cpu_for_cuda():
        if algo == "memit":
            import memit.memit_main as main_module
            from memit.memit_hparams import MEMITHyperParams as Params
        else:
            import AlphaEdit.AlphaEdit_main as main_module
            from AlphaEdit.AlphaEdit_hparams import AlphaEditHyperParams as Params
        params = Params(**{k: v for k, v in hp.items()
                           if k in Params.__dataclass_fields__})
        main_module.STATS_DIR = inputs["stats_dir"]
        main_module.CONTEXT_TEMPLATES_CACHE = inputs["templates"]
        real_z = main_module.compute_z

        def recording_z(*a, **k):
            z = real_z(*a, **k)
            their_z.append(z.detach().clone())
            return z
        main_module.compute_z = recording_z
        if algo == "memit":
            for batch in inputs["batches"]:
                main_module.apply_memit_to_model(model, tok, batch, params)
        else:
            d = model.get_submodule(modules[0]).weight.shape[1]
            projections = torch.zeros(len(modules), d, d)
            for i, m in enumerate(modules):  # experiments/evaluate.py's get_project
                cov = main_module.get_cov(model, tok, m, params.mom2_dataset,
                                          params.mom2_n_samples, params.mom2_dtype).cpu()
                u, s, _ = torch.linalg.svd(cov, full_matrices=False)
                null = u[:, s < params.nullspace_threshold]
                projections[i] = null @ null.T
            cache_c = torch.zeros(len(modules), d, d)
            for batch in inputs["batches"]:
                _, cache_c = main_module.apply_AlphaEdit_to_model(model, tok, batch, params,
                                                                 cache_c=cache_c, P=projections)
    first = len(inputs["batches"][0])
    tensors = {m: model.get_submodule(m).weight.detach().contiguous() for m in modules}
    tensors["z"] = torch.stack(their_z[:first]).contiguous()
    tensors["probe_logits"] = probe_logits
    save_file(tensors, str(work / "theirs.safetensors"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--code", help="a checkout of jianghoucheng/AlphaEdit")
    ap.add_argument("--python", help="the Python of the authors' environment (transformers 4)")
    ap.add_argument("--run", help="the rlsedit run folder to compare with")
    ap.add_argument("--stats", help="`rlsedit stats export` of that run")
    ap.add_argument("--out", help="the markdown report to write; its folder keeps the inputs")
    ap.add_argument("--their-side", metavar="WORK", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.their_side:
        their_side(Path(args.their_side))
        return
    import subprocess

    from omegaconf import OmegaConf
    from safetensors.torch import load_file

    from rlsedit_cli.config import register
    from rlsedit_cli.editing.targets import optimise_targets
    from rlsedit_cli.editors.base import target_config
    from rlsedit_cli.eval.counterfact import probability_metrics
    from rlsedit_cli.models.loader import load_configured
    from rlsedit_cli.runner.run import build

    register()
    run, out = Path(args.run).resolve(), Path(args.out).resolve()
    work = out.parent / f"{out.stem}_work"
    cfg = OmegaConf.load(run / "config.yaml")
    algo = str(cfg.editor.name)
    if algo not in ("memit", "alphaedit") or cfg.stream.shuffle:
        sys.exit("--run must be an rlsedit run of editor=memit or alphaedit, stream.shuffle=false")
    handle = load_configured(cfg, torch.device("cpu"))
    records = build(cfg.dataset).records[int(cfg.stream.offset):][: int(cfg.stream.num_edits)]
    size = int(cfg.stream.batch_size)
    batches = [records[i : i + size] for i in range(0, len(records), size)]
    templates = json.loads((run / "context_templates.json").read_text())
    layers = list(cfg.editor.layers)
    modules = [cfg.model.mlp_out_template.format(layer) for layer in layers]
    name = "rlsedit_side_by_side"
    place_stats(Path(args.stats).resolve(), work / "stats", name, modules,
                int(cfg.model.anchor_samples))
    model_dir = work / "model"
    if not model_dir.is_dir():
        handle.model.save_pretrained(model_dir)
        handle.tok.save_pretrained(model_dir)
    probe = records[0].prompt.format(records[0].subject)
    inputs = {"code": str(Path(args.code).resolve()), "model": str(model_dir), "name": name,
              "probe": probe,
              "algo": algo, "modules": modules, "stats_dir": str(work / "stats"),
              "templates": templates, "hparams": their_hparams(algo, cfg, name),
              "batches": [[{"case_id": r.case_id, "prompt": r.prompt, "subject": r.subject,
                            "target_new": {"str": r.target_new},
                            "target_true": {"str": r.target_true}} for r in b]
                          for b in batches]}
    text = json.dumps(inputs, indent=1)
    done = (work / "theirs.safetensors").is_file() and (work / "inputs.json").read_text() == text
    if not done:  # their run of these inputs is kept: run again, only the comparison is
        (work / "inputs.json").write_text(text)
        subprocess.run([args.python, __file__, "--their-side", str(work)], check=True)

    theirs = load_file(work / "theirs.safetensors")  # noqa: F821
    w0 = {m: handle.model.get_submodule(m).weight.detach().clone() for m in modules}
    with torch.no_grad():
        ours_logits = handle.model(torch.tensor([handle.tok(probe)["input_ids"]])).logits[0]
    probe_gap = float((ours_logits - theirs["probe_logits"]).abs().max())
    before = probability_metrics(handle, records, 64)
    target = target_config(OmegaConf.to_container(cfg.editor.target, resolve=True))
    flat = [t for group in templates for t in group]
    ours_z = optimise_targets(handle, batches[0], flat, max(layers), target).z
    ours_w = {m: w for m in modules for k, w in load_file(run / "final_maps.safetensors").items()
              if m == cfg.model.mlp_out_template.format(k)}  # saved by layer
    after = {}
    for who, maps in (("theirs", theirs), ("ours", ours_w)):
        for m in modules:
            handle.model.get_submodule(m).weight.data.copy_(maps[m])
        after[who] = probability_metrics(handle, records, 64)
    write_report(out, algo, cfg, records, templates, probe_gap, ours_z, theirs["z"], w0, ours_w,
                 {m: theirs[m] for m in modules}, before, after["ours"], after["theirs"])


def write_report(out, algo, cfg, records, templates, probe_gap, ours_z, their_z, w0, ours_w,
                 theirs_w, before, ours_after, theirs_after) -> None:
    gap = ((ours_z - their_z).norm(dim=-1) / their_z.norm(dim=-1)).tolist()
    lines = [f"# {algo}: rlsedit against the authors' code", "",
             f"{len(records)} records in file order, batches of {cfg.stream.batch_size}, "
             f"{sum(len(g) for g in templates)} context templates (the run's), its anchor "
             "statistics exported and read by the authors' layer_stats.", "",
             "| what | agreement |", "|---|---|",
             f"| the unedited model's logits on {records[0].case_id}'s prompt | largest "
             f"difference {probe_gap:.2e} |",
             f"| targets z of batch 0 | relative difference median "
             f"{sorted(gap)[len(gap) // 2]:.2e}, largest {max(gap):.2e} |"]
    for m, w in w0.items():
        d_ours, d_theirs = ours_w[m].float() - w, theirs_w[m] - w
        lines.append(f"| {m}: norm of the change | rlsedit {d_ours.norm():.4f}, authors "
                     f"{d_theirs.norm():.4f}, difference {(d_ours - d_theirs).norm():.2e} "
                     f"({float((d_ours - d_theirs).norm() / d_theirs.norm()):.2e} of it) |")
    for metric in ("efficacy", "generalization", "specificity"):
        a, b = ours_after[metric], theirs_after[metric]
        same = int((a == b).sum())
        lines.append(f"| {metric} per record | the same for {same} of {len(a)}; mean rlsedit "
                     f"{100 * a.mean():.1f}, authors {100 * b.mean():.1f} (unedited "
                     f"{100 * before[metric].mean():.1f}) |")
    out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
