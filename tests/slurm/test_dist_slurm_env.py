"""trainer/dist.py on the variables srun sets (no Slurm needed): what each rank derives."""

from __future__ import annotations

from trainer.dist import read_dist_info


def slurm_env(procid: int, nodeid: int, localid: int, tasks_per_node: str, ntasks: int) -> dict:
    return {
        "SLURM_PROCID": str(procid),
        "SLURM_NODEID": str(nodeid),
        "SLURM_LOCALID": str(localid),
        "SLURM_NTASKS": str(ntasks),
        "SLURM_STEP_TASKS_PER_NODE": tasks_per_node,
        "SLURM_JOB_NODELIST": "gpu[007-009],cpu1",
        "SLURM_JOB_ID": "123456",
    }


def test_rank_world_and_master_from_slurm() -> None:
    info = read_dist_info(slurm_env(5, 1, 1, "4(x2),3", 11))
    assert (info.rank, info.world_size, info.local_rank) == (5, 11, 1)
    assert (info.local_world_size, info.master_addr, info.launcher) == (4, "gpu007", "slurm")
    assert info.master_port == 20000 + 123456 % 20000


def test_uneven_last_node_and_overrides() -> None:
    env = slurm_env(10, 2, 2, "4(x2),3", 11) | {"MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "29400"}
    info = read_dist_info(env)
    assert (info.local_world_size, info.master_addr, info.master_port) == (3, "10.0.0.1", 29400)


def test_launcher_variables_win_over_slurm() -> None:
    env = slurm_env(5, 1, 1, "4(x2),3", 11) | {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1"}
    info = read_dist_info(env)
    assert (info.rank, info.world_size, info.launcher) == (1, 2, "torchrun")
