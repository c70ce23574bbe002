"""Shared machinery of the adversarial suites (test_hostile, test_faults, test_malicious_pickle,
test_validate_agrees), in three modules, re-exported here (``import _hostile_helpers as H``):

* ``_hostile_seeds``: seed files of every supported format, tiny and matching one another;
* ``_hostile_mutations``: mutators that turn a valid file into hostile ones, special paths;
* ``_hostile_commands``: the command table (argument lists from each command's real Click
  options; a command that fails to import fails the tests), the in-process and subprocess
  runners, the one assertion every case obeys, and input-integrity hashes.
"""

from __future__ import annotations

from _hostile_commands import (  # noqa: F401
    CHILD, ERROR_RE, Hang, Invocation, Result, adapter_invocations, address_space_bound,
    base_invocations, child_argv, child_env, command, fuzz_examples, hang_guard, input_paths,
    long_fuzz, options_of, problem, run_inprocess, run_subprocess, tree_hashes)
from _hostile_mutations import (  # noqa: F401
    A_SUFFIXES, B_SUFFIXES, kohya_mutations, loratool_metadata_mutations, peft_dir_mutations,
    pt_mutations, safetensors_mutations, special_paths, st_build, st_join, st_join_text,
    st_split, st_tensors)
from _hostile_seeds import (  # noqa: F401
    ALPHA, BASE_SHAPES, PEFT_CONFIG, RANK, REPO, Seeds, base_state, build_seeds,
    make_loratool_adapter, write_base, write_base_pt, write_kohya, write_loralib,
    write_peft_dir, write_sharded_base)
