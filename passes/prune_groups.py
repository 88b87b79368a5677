"""Dependency groups for structured pruning: which channels of which weights must go together.

    deps = find_groups(g)                 # unit="head": attention is pruned by heads
    print(format_groups(deps))            # one block per group: members, size, why not

Every conv / linear layer is a *space* of channel units (its output channels, or its heads
once a view splits them as [..., heads, d]). Units flow forward through the graph as the
labels of one tracked axis per tensor (per-op rules in passes/prune_ops.py); elementwise
ops, residual adds and batched products *couple* the units of their operands (edges of a
networkx graph over units), concatenation offsets them, flatten repeats them, depthwise
convs pass them through. Coupled units form a channel *class* (removed together); spaces
whose classes touch form a *group*, the thing that is scored and pruned. A group whose
channels reach a graph output or pass through an op the table does not know is blocked,
with the reason.
"""

from __future__ import annotations

import fnmatch
import operator
from dataclasses import dataclass, field

import networkx as nx
import torch
from torch import fx

from graphc.ir import Graph, op_name
from graphc.passes.prune_ops import OPS, Track, _shape

LAYERS = (torch.ops.aten.convolution.default, torch.ops.aten.addmm.default,
          torch.ops.aten.mm.default, torch.ops.aten.linear.default)


@dataclass
class Space:
    node: str        # the layer whose output channels these are
    op: str
    units: list[int]
    head: int = 1    # channels per unit: d for attention heads


@dataclass
class Member:
    weight: str              # get_attr target
    axis: int
    index: torch.Tensor      # per index along axis: the group's channel, or -1 (not this group)
    sites: list[str]         # the nodes that read it
    kind: str                # "weight" (a layer's weight: scored) or "aux" (bias, batchnorm)


@dataclass
class Group:
    id: int
    spaces: list[str]        # layer nodes whose output channels form the group
    size: int                # channels (or heads)
    unit: int                # channels per unit (1, or d for heads)
    members: list[Member] = field(default_factory=list)
    blocked: str | None = None

    def matches(self, pattern: str) -> bool:
        """On its layers' node names and their own weights (not the next layer's input)."""
        names = self.spaces + [m.weight for m in self.members
                               if m.kind == "weight" and set(m.sites) & set(self.spaces)]
        return any(fnmatch.fnmatchcase(x, pattern) for x in names)


@dataclass
class Dependencies:
    groups: list[Group]
    cls: dict          # (weight, axis) -> global class per index (-1: never removed)
    consts: dict       # (node, arg, pos | None) -> global class per index of that size
    owner: list        # global class -> (group id, channel within the group)


def find_groups(g: Graph, unit: str = "channel") -> Dependencies:
    """The channel groups of `g`; unit="head" splits attention projections into heads."""
    an = _Analysis(g, unit)
    an.run()
    return an.finish()


class _Analysis:
    def __init__(self, g: Graph, unit: str):
        self.g, self.unit = g, unit
        self.spaces: list[Space] = []
        self.space_of: list[int] = []      # unit -> space
        self.alias: dict[int, int] = {}    # a channel unit -> the head unit it became
        self.edges: list[tuple[int, int]] = []
        self.members: dict[tuple[str, int], list] = {}  # -> [labels, sites, kind]
        self.consts: dict[tuple, torch.Tensor] = {}
        self.blocks: list[tuple[torch.Tensor, str]] = []
        self.tracks: dict[fx.Node, object] = {}

    # ---- the rules' interface ---------------------------------------------------------
    def new_space(self, n: fx.Node, size: int) -> torch.Tensor:
        first = len(self.space_of)
        self.spaces.append(Space(n.name, op_name(n), list(range(first, first + size))))
        self.space_of += [len(self.spaces) - 1] * size
        return torch.arange(first, first + size)

    def member(self, w: fx.Node, axis: int, labels: torch.Tensor, site: fx.Node, kind: str):
        key = (str(w.target), axis)
        if _shape(w)[axis] != len(labels):
            return self.block_track(Track(axis, labels), site, f"{key[0]} axis {axis} has "
                                    f"{_shape(w)[axis]} entries for {len(labels)} channels")
        if key not in self.members:
            self.members[key] = [labels, [site.name], kind]
            return None
        rec = self.members[key]
        rec[0] = self.couple(rec[0], labels, site)  # a weight read twice: one choice
        rec[1].append(site.name)
        rec[2] = "weight" if "weight" in (rec[2], kind) else kind
        return None

    def const(self, n: fx.Node, arg: int, pos: int | None, labels: torch.Tensor) -> None:
        self.consts[(n.name, arg, pos)] = labels

    def block_track(self, t: Track | None, n: fx.Node, reason: str) -> None:
        if t is not None:
            self.blocks.append((t.labels, f"%{n.name} ({op_name(n)}): {reason}"))

    def couple(self, a: torch.Tensor, b: torch.Tensor, n: fx.Node) -> torch.Tensor:
        """Index i of a and of b must be removed together; returns the merged labels."""
        if len(a) != len(b):
            self.block_track(Track(0, a), n, "channel counts differ")
            self.block_track(Track(0, b), n, "channel counts differ")
            return a
        one = (a < 0) != (b < 0)
        if one.any():  # a prunable channel meets one that no layer owns
            self.block_track(Track(0, torch.where(a < 0, b, a)[one]), n,
                             "channels meet channels no prunable layer owns")
        both = (a >= 0) & (b >= 0)
        self.edges += list(zip(a[both].tolist(), b[both].tolist()))
        return torch.where(a >= 0, a, b)

    def view(self, n: fx.Node, x: Track) -> Track | None:
        """view/reshape: the labels move to the one output axis they depend on; a split
        into [..., heads, d] makes heads the units (unit="head")."""
        ins, outs = _shape(n.args[0]), _shape(n)
        i0, i1, j0, j1 = next(r for r in _reshape_groups(ins, outs) if r[0] <= x.axis < r[1])
        shape = [1] * (i1 - i0)
        shape[x.axis - i0] = -1
        t = x.labels.reshape(shape).expand(ins[i0:i1]).reshape(outs[j0:j1])
        axes = [b for b in range(t.dim()) if (t != t.narrow(b, 0, 1)).any()]
        if len(axes) == 1:
            b = axes[0]
            line = t.movedim(b, 0).reshape(t.shape[b], -1)[:, 0].clone()
            self._size_const(n, j0 + b, line)
            return Track(j0 + b, line)
        if len(axes) > 1 and self.unit == "head" and axes[-2:] == [t.dim() - 2, t.dim() - 1]:
            return self._heads(n, t, j0)
        hint = "; prune attention heads with unit='head'" if len(axes) > 1 else ""
        return self.block_track(x, n, f"channels split over several axes {outs}{hint}")

    # ---- helpers ----------------------------------------------------------------------
    def _size_const(self, n: fx.Node, pos: int, labels: torch.Tensor) -> None:
        if list(n.args[1])[pos] != -1:
            self.const(n, 1, pos, labels)

    def _heads(self, n: fx.Node, t: torch.Tensor, j0: int) -> Track | None:
        """[..., H, d]: the space's channel units become H head units (d channels each)."""
        spaces = {self.space_of[u] for u in t.flatten().tolist() if u >= 0}
        space = self.spaces[next(iter(spaces))] if len(spaces) == 1 else None
        if space is None or (t < 0).any() or space.head != 1 or \
                sorted(t.flatten().tolist()) != sorted(space.units):
            return self.block_track(Track(0, t.flatten()), n,
                                    "heads split from channels of several layers")
        h_axis, heads, d = t.dim() - 2, t.shape[-2], t.shape[-1]
        new = self.new_space(n, heads)
        self.spaces.pop()
        self.space_of[-heads:] = [self.spaces.index(space)] * heads
        head_of = new.reshape([heads if i == h_axis else 1 for i in range(t.dim())])
        for old, h in zip(t.flatten().tolist(), head_of.expand(t.shape).flatten().tolist()):
            self.alias[old] = h
        space.units, space.head = new.tolist(), d
        self._size_const(n, j0 + h_axis, new)
        return Track(j0 + h_axis, new)

    def run(self) -> None:
        for n in self.g.gm.graph.nodes:
            if n.op == "output":
                for a in _flat(n.args[0]):
                    t = self.tracks.get(a)
                    self.block_track(t if isinstance(t, Track) else None, a,
                                     "its channels reach the graph output")
            elif n.op == "call_function":
                self._visit(n)

    def _visit(self, n: fx.Node) -> None:
        tr = {}
        for i, a in enumerate(n.args):
            if isinstance(a, (list, tuple)):
                tr.update({(i, k): self.tracks[x] for k, x in enumerate(a)
                           if isinstance(self.tracks.get(x), Track)})
            elif isinstance(self.tracks.get(a), (Track, dict)):
                tr[i] = self.tracks[a]
        if n.target is operator.getitem and isinstance(tr.get(0), dict):
            out = tr[0].get(n.args[1])
        elif not tr and n.target not in LAYERS:
            return
        elif n.target not in OPS:
            for t in tr.values():
                self.block_track(t if isinstance(t, Track) else None, n,
                                 "an op the pruning table does not know")
            return
        else:
            out = OPS[n.target](self, n, {k: v for k, v in tr.items() if isinstance(v, Track)})
        if out is not None:
            self.tracks[n] = out

    def finish(self) -> Dependencies:
        res = self._resolve
        units = sorted({res(u) for s in self.spaces for u in s.units})
        ug = nx.Graph()
        ug.add_nodes_from(units)
        ug.add_edges_from((res(a), res(b)) for a, b in self.edges)
        classes = sorted((sorted(c) for c in nx.connected_components(ug)), key=min)
        cls_of = {u: i for i, c in enumerate(classes) for u in c}
        sg = nx.Graph()  # spaces, linked by shared classes
        sg.add_nodes_from(range(len(self.spaces)))
        for c in classes:
            sg.add_edges_from((self.space_of[c[0]], self.space_of[u]) for u in c[1:])
        comps = sorted((sorted(c) for c in nx.connected_components(sg)), key=min)
        owner, groups = [None] * len(classes), []
        for gid, comp in enumerate(comps):
            mine = [i for i, c in enumerate(classes) if self.space_of[c[0]] in comp]
            for k, i in enumerate(mine):
                owner[i] = (gid, k)
            s0 = self.spaces[comp[0]]
            groups.append(Group(gid, [self.spaces[s].node for s in comp], len(mine), s0.head))
        self._blocked(classes, cls_of, owner, groups)

        def to_cls(labels: torch.Tensor) -> torch.Tensor:
            return torch.tensor([cls_of[res(u)] if u >= 0 else -1 for u in labels.tolist()],
                                dtype=torch.long)
        cls = {k: to_cls(v[0]) for k, v in self.members.items()}
        for (w, axis), c in cls.items():
            for gid in sorted({owner[i][0] for i in c.tolist() if i >= 0}):
                index = torch.tensor([owner[i][1] if i >= 0 and owner[i][0] == gid else -1
                                      for i in c.tolist()])
                _, sites, kind = self.members[(w, axis)]
                groups[gid].members.append(Member(w, axis, index, sites, kind))
        consts = {k: to_cls(v) for k, v in self.consts.items()}
        return Dependencies(groups, cls, consts, owner)

    def _resolve(self, u: int) -> int:
        while u in self.alias:
            u = self.alias[u]
        return u

    def _blocked(self, classes, cls_of, owner, groups) -> None:
        for labels, reason in self.blocks:
            for u in labels.tolist():
                if u >= 0 and groups[owner[cls_of[self._resolve(u)]][0]].blocked is None:
                    groups[owner[cls_of[self._resolve(u)]][0]].blocked = reason
        for c in classes:  # two channels of one layer coupled: they cannot move apart
            if len({self.space_of[u] for u in c}) < len(c):
                g = groups[owner[cls_of[c[0]]][0]]
                g.blocked = g.blocked or (f"channels of %{self.spaces[self.space_of[c[0]]].node}"
                                          " are coupled with each other")


def _flat(x):
    if isinstance(x, (list, tuple)):
        for y in x:
            yield from _flat(y)
    elif isinstance(x, fx.Node):
        yield x


def _reshape_groups(a, b) -> list[tuple[int, int, int, int]]:
    """Runs of input dims [i0, i1) and output dims [j0, j1) of a reshape with equal sizes."""
    out, i, j = [], 0, 0
    while i < len(a) or j < len(b):
        i0, j0, pa, pb = i, j, 1, 1
        if i < len(a):
            pa, i = a[i], i + 1
        if j < len(b):
            pb, j = b[j], j + 1
        while pa != pb:
            if pa < pb:
                pa, i = pa * a[i], i + 1
            else:
                pb, j = pb * b[j], j + 1
        out.append((i0, i, j0, j))
    return out


def format_groups(deps: Dependencies) -> str:
    """One block per group: its layers, size, members (weight, axis, indices) or why not."""
    lines = []
    for grp in deps.groups:
        unit = f"heads of {grp.unit}" if grp.unit > 1 else "channels"
        head = f"group {grp.id}: {grp.size} {unit} from {', '.join('%' + s for s in grp.spaces)}"
        lines.append(head + (f"  [unprunable: {grp.blocked}]" if grp.blocked else ""))
        for m in grp.members:
            n = int((m.index >= 0).sum())
            lines.append(f"  {m.weight}[axis {m.axis}]: {n} of {len(m.index)} ({m.kind}, "
                         f"read by {', '.join('%' + s for s in m.sites)})")
    return "\n".join(lines)
