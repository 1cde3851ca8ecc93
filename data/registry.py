"""The VTAB-1k task registry (facts: ../shared/spec/vtab.md, sections 1-3).

One entry per task: folder name, class count, group, and the size of each split of the
pre-processed folder format. The bundled offline demo task ``digits`` lives here too.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from common.errors import UserError

SPLITS = ("train800", "val200", "train800val200", "test")
GROUPS = ("natural", "specialized", "structured")


@dataclass(frozen=True)
class Task:
    name: str                       # folder name under the data root
    num_classes: int
    group: str                      # natural | specialized | structured | demo
    test_size: int
    aliases: tuple[str, ...] = ()
    # Test sizes that are also accepted (with a warning), e.g. caltech101's 6085 lines
    # in the widely shared pre-processed archive vs 6084 in every TFDS version.
    test_size_alternatives: tuple[int, ...] = ()
    split_sizes: dict = field(default_factory=dict)

    def expected_size(self, split: str) -> int:
        sizes = {"train800": 800, "val200": 200, "train800val200": 1000, "test": self.test_size}
        sizes.update(self.split_sizes)
        return sizes[split]

    def accepted_sizes(self, split: str) -> tuple[int, ...]:
        if split == "test":
            return (self.test_size, *self.test_size_alternatives)
        return (self.expected_size(split),)


# Table order of PETL papers (vtab.md section 1.0).
TASKS: dict[str, Task] = {
    t.name: t
    for t in [
        Task("cifar", 100, "natural", 10000, aliases=("cifar100",)),
        Task("caltech101", 102, "natural", 6084, test_size_alternatives=(6085,)),
        Task("dtd", 47, "natural", 1880),
        Task("oxford_flowers102", 102, "natural", 6149, aliases=("flowers102",)),
        Task("oxford_iiit_pet", 37, "natural", 3669, aliases=("oxford_pet", "pets")),
        Task("svhn", 10, "natural", 26032),
        Task("sun397", 397, "natural", 21750),
        Task("patch_camelyon", 2, "specialized", 32768, aliases=("camelyon",)),
        Task("eurosat", 10, "specialized", 5400),
        Task("resisc45", 45, "specialized", 6300),
        Task("diabetic_retinopathy", 5, "specialized", 42670, aliases=("retinopathy",)),
        Task("clevr_count", 8, "structured", 15000),
        Task("clevr_dist", 6, "structured", 15000),
        Task("dmlab", 6, "structured", 22735),
        Task("kitti", 4, "structured", 711),
        Task("dsprites_loc", 16, "structured", 73728),
        Task("dsprites_ori", 16, "structured", 73728),
        Task("smallnorb_azi", 18, "structured", 12150),
        Task("smallnorb_ele", 9, "structured", 12150),
        # Bundled offline demo: scikit-learn's 1797 handwritten digits,
        # 800 / 200 / 1000 / the remaining 797 as test (see data/digits.py).
        Task("digits", 10, "demo", 797),
    ]
}

VTAB_TASKS: tuple[str, ...] = tuple(n for n, t in TASKS.items() if t.group != "demo")
_ALIASES = {a: t.name for t in TASKS.values() for a in t.aliases}


def get_task(name: str) -> Task:
    """Resolve a task name or alias; unknown names raise a UserError listing the valid ones."""
    key = str(name).strip().lower()
    key = _ALIASES.get(key, key)
    if key not in TASKS:
        raise UserError(
            f"unknown task '{name}'. Known tasks: {', '.join(TASKS)} "
            f"(aliases: {', '.join(f'{a}->{c}' for a, c in sorted(_ALIASES.items()))})."
        )
    return TASKS[key]
