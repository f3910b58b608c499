"""Launching past one GPU set and one node: the launcher command finetune.sh builds (GPU selection,
torchrun per node, DeepSpeed's hostfile with and without ssh, SLURM), the decisions all ranks share
(rank 0 decides, every rank stops together, the save folder every node must share), the threads of a
rank, and real runs of two nodes on loopback: the same weights as one node with two ranks, an exact
resume after both nodes are killed, and per-node save folders stopped with one message on both nodes."""
import json
import os
import shlex
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from conftest import CODE, REPO, kill_tree, script_env
from test_finetune import MAX_LENGTH, convert, lora_weights, small_dialogues
from test_resume import WRAPPER, logged

import checkpoints
import distributed
import finetune


# ------------------------------------------------------------------------------------------------
# finetune.sh: the command it launches (DRY_RUN=1 prints it)
# ------------------------------------------------------------------------------------------------
LAUNCH_VARIABLES = {"GPUS", "CUDA_VISIBLE_DEVICES", "NNODES", "NODE_RANK", "MASTER_ADDR", "MASTER_PORT", "HOSTFILE",
                    "NO_SSH", "ACCELERATOR", "DRY_RUN"}


def sh_run(env, *args):
    """`bash finetune.sh ARGS` with ``env`` only of its launch settings (none from the test's own environment)."""
    base = {k: v for k, v in script_env().items() if k not in LAUNCH_VARIABLES and not k.startswith("SLURM_")}
    return subprocess.run(["bash", "finetune.sh", *args], cwd=REPO, capture_output=True, text=True, timeout=60,
                          env={**base, "ACCELERATOR": "gpu", **env})


def dry_run(env, *args):
    proc = sh_run({"DRY_RUN": "1", **env}, *args)
    assert proc.returncode == 0, proc.stderr
    return shlex.split(proc.stdout)


def split_launch(words):
    """(the launcher's words, the training arguments) of a finetune.sh command."""
    at = words.index("code/finetune.py")
    finetune.parse_args(words[at + 1:])   # what finetune.py gets parses
    return words[:at], words[at + 1:]


def deepspeed_args(launch):
    from deepspeed.launcher import runner

    assert launch[0] == "deepspeed"
    return runner.parse_args(launch[1:] + ["code/finetune.py"])


def test_finetune_sh_runs_on_the_gpus_it_is_given():
    from deepspeed.launcher import runner

    launch, train = split_launch(dry_run({"GPUS": "4,5", "CUDA_VISIBLE_DEVICES": "0,1"}, "--lr", "1e-4"))
    args = deepspeed_args(launch)
    # --include, not a count: DeepSpeed's launcher drops CUDA_VISIBLE_DEVICES once it gets --num_gpus
    assert args.include == "localhost:4,5" and args.num_gpus == -1 and args.num_nodes == -1
    assert runner.parse_inclusion_exclusion({"localhost": 8}, args.include, "") == {"localhost": [4, 5]}
    assert train[-2:] == ["--lr", "1e-4"] and "--use_lora" in train
    # the default: the scheduler's CUDA_VISIBLE_DEVICES, else all eight
    assert deepspeed_args(split_launch(dry_run({"CUDA_VISIBLE_DEVICES": "2,3"}))[0]).include == "localhost:2,3"
    assert deepspeed_args(split_launch(dry_run({}))[0]).include == "localhost:0,1,2,3,4,5,6,7"
    # without a GPU, GPUS counts the CPU ranks
    args = deepspeed_args(split_launch(dry_run({"GPUS": "4,5", "ACCELERATOR": "cpu"}))[0])
    assert args.num_gpus == 2 and args.include == ""


def test_finetune_sh_launches_every_node(tmp_path):
    from deepspeed.launcher import runner
    from torch.distributed.run import get_args_parser

    # one torchrun per node, the GPUs chosen through CUDA_VISIBLE_DEVICES (which torchrun leaves alone)
    launch, _ = split_launch(dry_run({"NNODES": "2", "NODE_RANK": "1", "MASTER_ADDR": "10.0.0.1", "GPUS": "4,5",
                                      "MASTER_PORT": "29400"}))
    assert launch[:3] == ["env", "CUDA_VISIBLE_DEVICES=4,5", "torchrun"]
    args = get_args_parser().parse_args(launch[3:] + ["code/finetune.py"])
    assert (args.nnodes, args.node_rank, args.nproc_per_node, args.master_addr, args.master_port) == \
        ("2", 1, "2", "10.0.0.1", 29400)
    # DeepSpeed's launcher over a hostfile: from node 0 over ssh, or on each node without ssh
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("# two nodes\nnodeA slots=8\nnodeB slots=8\n\nnodeC slots=8\n")
    args = deepspeed_args(split_launch(dry_run({"HOSTFILE": str(hostfile), "NNODES": "2", "GPUS": "4,5"}))[0])
    assert not args.no_ssh and args.master_addr == ""
    assert runner.parse_inclusion_exclusion(runner.fetch_hostfile(args.hostfile), args.include, "") == \
        {"nodeA": [4, 5], "nodeB": [4, 5]}
    args = deepspeed_args(split_launch(dry_run({"HOSTFILE": str(hostfile), "NO_SSH": "1", "NODE_RANK": "2",
                                                "MASTER_ADDR": "nodeA"}))[0])
    assert args.no_ssh and args.node_rank == 2 and args.master_addr == "nodeA"
    assert runner.parse_inclusion_exclusion(runner.fetch_hostfile(args.hostfile), args.include, "") == \
        {host: list(range(8)) for host in ("nodeA", "nodeB", "nodeC")}   # GPUS not given: every slot
    # a SLURM step: the node count and number from srun, node 0's name from scontrol
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text("#!/bin/sh\n[ \"$3\" = 'gpu[07-08]' ] && printf 'gpu07\\ngpu08\\n'\n")
    (bin_dir / "scontrol").chmod(0o755)
    slurm = {"SLURM_STEP_NUM_NODES": "2", "SLURM_STEP_NUM_TASKS": "2", "SLURM_NODEID": "1",
             "SLURM_STEP_NODELIST": "gpu[07-08]", "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    launch, _ = split_launch(dry_run(slurm))
    args = get_args_parser().parse_args(launch[3:] + ["code/finetune.py"])
    assert (args.nnodes, args.node_rank, args.master_addr) == ("2", 1, "gpu07")


@pytest.mark.parametrize("env,needle", [
    ({"NNODES": "2", "NODE_RANK": "1"}, "MASTER_ADDR"),
    ({"NNODES": "2", "MASTER_ADDR": "10.0.0.1", "NODE_RANK": "2"}, "NODE_RANK=2"),
    ({"NNODES": "two"}, "NNODES=two"),
    ({"GPUS": "cuda:0"}, "GPUS=cuda:0"),
    ({"NO_SSH": "1"}, "HOSTFILE"),
    ({"HOSTFILE": "no/such/hostfile"}, "HOSTFILE=no/such/hostfile"),
    ({"SLURM_STEP_NUM_NODES": "2", "SLURM_STEP_NUM_TASKS": "16"}, "--ntasks-per-node=1"),
    ({"ACCELERATOR": "tpu"}, "ACCELERATOR=tpu"),
])
def test_finetune_sh_bad_launch_settings_stop_with_one_line(env, needle):
    proc = sh_run(env)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.startswith("error: ") and proc.stderr.count("\n") == 1 and needle in proc.stderr


# ------------------------------------------------------------------------------------------------
# what every rank shares
# ------------------------------------------------------------------------------------------------
def test_threads_per_rank_split_the_cores_of_this_node_only():
    # torchrun says LOCAL_WORLD_SIZE; DeepSpeed's launcher says LOCAL_SIZE (ranks of this node) only
    assert distributed.threads_per_rank({"LOCAL_WORLD_SIZE": "2", "WORLD_SIZE": "16"}, cores=16) == 8
    assert distributed.threads_per_rank({"LOCAL_SIZE": "4", "WORLD_SIZE": "16", "RANK": "5"}, cores=16) == 4
    assert distributed.threads_per_rank({"WORLD_SIZE": "2"}, cores=16) == 8
    assert distributed.threads_per_rank({}, cores=16) == 16
    assert distributed.threads_per_rank({"LOCAL_SIZE": "32"}, cores=16) == 1


RANKS = textwrap.dedent(f"""
    import json, os, sys
    sys.path.insert(0, {CODE!r})
    import torch, torch.distributed as dist
    import checkpoints
    import distributed
    from data_io import DataError

    dist.init_process_group("gloo")
    rank, cpu, out = dist.get_rank(), torch.device("cpu"), {{}}
    shared, own = sys.argv[1], sys.argv[2] + str(dist.get_rank())
    complete, partial = sys.argv[3], sys.argv[4]   # checkpoints with both ranks' random states, rank 0's only

    def attempt(name, action):
        try:
            out[name] = {{"value": action()}}
        except DataError as e:
            out[name] = {{"error": str(e)}}

    def refuse():
        raise DataError("--data_path d.pkl: file not found")

    attempt("decided", lambda: distributed.rank0_decides(lambda: {{"rank": rank, "path": "ckp/运行"}}, cpu))
    attempt("rank0_refuses", lambda: distributed.rank0_decides(refuse, cpu))
    attempt("rank1_fails", lambda: distributed.stop_together("--model_path m: not found" if rank else None, cpu))
    attempt("none_fails", lambda: distributed.stop_together(None, cpu))
    attempt("shared_dir", lambda: distributed.check_shared_dir(shared, "--save_dir", cpu))
    attempt("own_dirs", lambda: distributed.check_shared_dir(own, "--save_dir", cpu))
    attempt("states", lambda: checkpoints.read_rank_states(complete, rank, cpu)["rank"])
    attempt("rank1_state_missing", lambda: checkpoints.read_rank_states(partial, rank, cpu)["rank"])
    print(json.dumps(out), flush=True)
    dist.barrier()
    dist.destroy_process_group()   # a gloo group left to the interpreter's exit can abort the process
""")


def test_ranks_decide_together_and_stop_together(tmp_path):
    script = tmp_path / "ranks.py"
    script.write_text(RANKS)
    stale = tmp_path / "own1" / distributed.SHARED_DIR_MARKER
    stale.parent.mkdir()
    stale.write_text("an old run's token")   # node 1's own disk, with a marker of an earlier run
    for name, ranks in (("complete", 2), ("partial", 1)):   # a checkpoint's state files (made up)
        state = tmp_path / name / checkpoints.STATE_DIR
        (state / checkpoints.ENGINE_TAG).mkdir(parents=True)
        torch.save({"module": {"w": torch.zeros(2)}}, state / checkpoints.ENGINE_TAG / "mp_rank_00_model_states.pt")
        for r in range(ranks):
            torch.save({"rank": r}, state / f"rng_rank{r}.pt")
    port = str(distributed.free_port())
    procs = [subprocess.Popen([sys.executable, str(script), str(tmp_path / "shared"), str(tmp_path / "own"),
                               str(tmp_path / "complete"), str(tmp_path / "partial")],
                              cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env=script_env({"RANK": str(r), "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
                                              "MASTER_PORT": port})) for r in range(2)]
    try:
        outputs = [p.communicate(timeout=120) for p in procs]
    finally:
        for p in procs:
            kill_tree(p.pid)
            p.wait()
    for p, (out, err) in zip(procs, outputs):
        assert p.returncode == 0, err[-3000:]
    rank0, rank1 = (json.loads(out.splitlines()[-1]) for out, _ in outputs)   # (after what imports print)
    # every outcome the same on both ranks, but each one's own random states
    assert [rank0.pop("states"), rank1.pop("states")] == [{"value": 0}, {"value": 1}]
    assert rank0 == rank1
    assert rank0["decided"] == {"value": {"rank": 0, "path": "ckp/运行"}}
    assert rank0["rank0_refuses"] == {"error": "--data_path d.pkl: file not found"}
    assert rank0["rank1_fails"]["error"].startswith("--model_path m: not found (rank 1, on ")
    assert rank0["none_fails"] == {"value": None} and rank0["shared_dir"] == {"value": None}
    assert os.listdir(tmp_path / "shared") == []   # the check file is gone again
    message = rank0["own_dirs"]["error"]
    assert "is not the same folder on every node" in message and "is another here" in message
    assert "filesystem every node shares" in message and "SAVE_DIR" in message and "(rank 1, on " in message
    # resuming: every rank stops with the message of the rank whose random states are missing
    message = rank0["rank1_state_missing"]["error"]
    assert "rng_rank1.pt is missing" in message and "(rank 1, on " in message


# ------------------------------------------------------------------------------------------------
# two nodes on loopback
# ------------------------------------------------------------------------------------------------
def launch(command, log, env=None):
    """Start a launcher (one node) with its output in file ``log``, in a session of its own."""
    with open(log, "w") as out:
        return subprocess.Popen(command, cwd=REPO, env=script_env(env), stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)


def run_nodes(commands, envs, logs_dir, timeout=600):
    """Start one launcher per node at once and wait for all: [(exit code, output)]; none outlives the call."""
    logs = [logs_dir / f"node{i}_{os.urandom(4).hex()}.log" for i in range(len(commands))]
    procs = [launch(c, log, e) for c, e, log in zip(commands, envs, logs)]
    try:
        for p in procs:
            p.wait(timeout=timeout)
    finally:
        for p in procs:
            kill_tree(p.pid)
            p.wait()
    return [(p.returncode, log.read_text()) for p, log in zip(procs, logs)]


def sh_env(tiny_model_dir, data, save_dir, port, **more):
    return dict(MODEL_PATH=tiny_model_dir, DATA_PATH=data, SAVE_DIR=str(save_dir), MASTER_PORT=str(port),
                ACCELERATOR="cpu", **more)


TRAIN = ["--max_length", str(MAX_LENGTH), "--max_epoches", "2", "--max_steps", "4", "--micro_batch_size", "1",
         "--grad_accum", "2", "--warmup_steps", "1", "--precision", "fp32", "--seed", "5", "--save_steps", "2",
         "--no_progress"]


@pytest.mark.slow
def test_two_nodes_lora_equals_one_node_and_per_node_save_dirs_stop_both(tiny_model_dir, tmp_path):
    data = convert(tiny_model_dir, str(tmp_path / "data"), small_dialogues() * 4)
    lora = TRAIN + ["--lr", "1e-2", "--lora_dropout", "0.1"]
    # the reference: one node, two ranks, with the arguments finetune.sh gives finetune.py
    _, train = split_launch(dry_run(sh_env(tiny_model_dir, data, tmp_path / "one", 29872, GPUS="0,1"), *lora))
    [(code, out)] = run_nodes(torchrun_nodes("code/finetune.py", train, 29872, 1), [{}], tmp_path)
    assert code == 0, out[-3000:]
    # two nodes of one rank: finetune.sh on each, one torchrun per node
    results = run_nodes([["bash", "finetune.sh"] + lora] * 2, [
        sh_env(tiny_model_dir, data, tmp_path / "two", 29873, GPUS="0", NNODES="2", NODE_RANK=str(rank),
               MASTER_ADDR="127.0.0.1") for rank in range(2)], tmp_path)
    for code, out in results:
        assert code == 0, out[-3000:]
    assert "ranks: 2" in results[0][1]
    expected, got = (lora_weights(tmp_path / run / "llama_lora" / "llama_lora_4") for run in ("one", "two"))
    assert any("lora_B" in k and expected[k].abs().max() > 1e-3 for k in expected)   # it trained
    for key in expected:
        assert torch.allclose(got[key], expected[key], atol=1e-6, rtol=0), key
    # a save folder per node (no shared filesystem): both nodes stop at start, with the same line
    results = run_nodes([["bash", "finetune.sh"] + lora] * 2, [
        sh_env(tiny_model_dir, data, tmp_path / f"node{rank}", 29874, GPUS="0", NNODES="2", NODE_RANK=str(rank),
               MASTER_ADDR="127.0.0.1") for rank in range(2)], tmp_path, timeout=300)
    lines = []
    for code, out in results:
        assert code != 0 and 'finetune.py", line' not in out, out[-3000:]   # no traceback of ours
        lines += [line for line in out.splitlines() if line.startswith("error: ")]
    assert len(lines) == 2 and lines[0] == lines[1], lines
    assert "is not the same folder on every node" in lines[0] and "(rank 1, on " in lines[0]
    assert not (tmp_path / "node0" / "llama_lora" / "train_log.jsonl").exists()   # no step was trained


def torchrun_nodes(script, args, port, nodes):
    common = [sys.executable, "-m", "torch.distributed.run", "--master_addr", "127.0.0.1", "--master_port", str(port)]
    if nodes == 1:
        return [common + ["--nproc_per_node", "2", script] + args]
    return [common + ["--nnodes", "2", "--node_rank", str(rank), "--nproc_per_node", "1", script] + args
            for rank in range(2)]


@pytest.mark.slow
def test_two_nodes_full_finetune_equals_one_node_and_resumes_after_both_nodes_are_killed(tiny_model_dir, tmp_path):
    data = convert(tiny_model_dir, str(tmp_path / "data"), small_dialogues() * 4, "--special_end_token")
    full = TRAIN + ["--model_path", tiny_model_dir, "--data_path", data, "--lr", "1e-3", "--save_name", "full"]
    wrapper = tmp_path / "finetune_with_kill_points.py"
    wrapper.write_text(WRAPPER)
    markers = tmp_path / "markers"
    markers.mkdir()
    # the reference: one node, two ranks
    [(code, out)] = run_nodes(torchrun_nodes("code/finetune.py", full + ["--save_dir", str(tmp_path / "one")],
                                             29875, 1), [{}], tmp_path)
    assert code == 0, out[-3000:]
    reference = logged(tmp_path / "one" / "full")
    # two nodes of one rank, both killed (SIGKILL, every process) once the checkpoint of step 2 is written
    two = full + ["--save_dir", str(tmp_path / "two")]
    procs = [launch(command, tmp_path / f"killed{i}.log", {"HANG_AFTER_STEP": "2", "MARKER_DIR": str(markers)})
             for i, command in enumerate(torchrun_nodes(str(wrapper), two, 29876, 2))]
    try:
        deadline = time.monotonic() + 300
        while not all((markers / f"after_rank{r}").exists() for r in range(2)):
            assert all(p.poll() is None for p in procs), (tmp_path / "killed0.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "the run never reached the kill point"
            time.sleep(0.2)
    finally:
        for proc in procs:
            kill_tree(proc.pid)
            proc.wait()
    run_dir = tmp_path / "two" / "full"
    assert not (run_dir / "full_4").exists() and (run_dir / "full_2").is_dir()
    # both restarted: they resume from the step-2 checkpoint and end where the one-node run ended
    results = run_nodes(torchrun_nodes("code/finetune.py", two + ["--resume_from", "latest"], 29877, 2), [{}, {}],
                        tmp_path)
    for code, out in results:
        assert code == 0, out[-3000:]
    assert f"resuming from {run_dir / 'full_2'}: step 2" in results[0][1]
    from safetensors.torch import load_file
    expected = load_file(str(tmp_path / "one" / "full" / "full_4" / "model.safetensors"))
    got = load_file(str(run_dir / "full_4" / "model.safetensors"))
    start_weights = load_file(str(run_dir / "full_2" / "model.safetensors"))
    assert max((expected[k] - start_weights[k]).abs().max().item() for k in expected) > 1e-4   # steps 3-4 trained
    for key in expected:
        assert torch.allclose(got[key], expected[key], atol=1e-6, rtol=0), key
    resumed = logged(run_dir)
    assert sorted(resumed) == [1, 2, 3, 4]
    for step in (3, 4):
        assert resumed[step] == pytest.approx(reference[step], abs=1e-6), step
