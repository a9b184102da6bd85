"""Persistent Gaussians (a sequence with identities) as one point set that moves.

When Gaussian i is the same Gaussian at every timestep (the fitting stage keeps identities:
the same count at every timestep, shared colour, opacity and scales, per-timestep means and
rotations), the asset holds one mesh object instead of one per timestep. Its vertices carry
the shared raw parameters once (`gs_log_scale`, `gs_opacity_logit`, `gs_sh0`, `gs_sh_rest_NN`)
and each timestep's means and rotations as named attributes `gs_t_position_<t>` and
`gs_t_rotation_<t>`. The asset's Geometry Nodes group reads the two timesteps around its
'Timestep' input, mixes them (positions linearly, rotations by slerp), sets the vertex
positions and `gs_rotation`, drops the per-timestep attributes and hands the points to the
core group that every asset uses. The modifier's 'Timestep' input is keyed linearly (frame of
timestep t -> t, constant before the first and after the last), so:
- playback changes no mesh and needs no handler (renders on a farm without the add-on agree);
- between keyed frames, subframes included, the Gaussians move continuously, so Cycles'
  deformation motion blur sees the vertices move (the proxies keep their vertex count);
- memory is what the data needs: 32 timesteps x 100k Gaussians hold 28 bytes per Gaussian and
  timestep, against 56 for the per-timestep layout that repeats the shared parameters.
"""

from __future__ import annotations

from collections.abc import Sequence

import bpy
import numpy as np

from . import animation, nodes
from .vendor.gaussians import Gaussians

FRAMES_PROP = "fourreal_frames"  # on the persistent object: scene frame of each timestep
POSITION_PREFIX = "gs_t_position_"
ROTATION_PREFIX = "gs_t_rotation_"
TIMESTEP_INPUT = "Timestep"
SHARED_FIELDS = ("log_scales", "opacity_logits", "sh0", "sh_rest")


def mismatch(steps: Sequence[Gaussians]) -> tuple[int, str] | None:
    """Why the timesteps are not one set of persistent Gaussians, as (timestep, reason), or
    None when they are: at least two timesteps, the same count in each and bit-identical
    colour (sh0, sh_rest), opacity and scale rows."""
    if len(steps) < 2:
        return 0, "a single timestep"
    first = steps[0]
    for t, g in enumerate(steps[1:], start=1):
        if len(g) != len(first):
            return t, f"{len(g)} Gaussians where the first timestep has {len(first)}"
        for name in SHARED_FIELDS:
            a, b = getattr(first, name), getattr(g, name)
            if (a is None) != (b is None) or (a is not None and not np.array_equal(a, b)):
                return t, f"its {name} differ from the first timestep's"
    return None


def _add_attribute(mesh: bpy.types.Mesh, name: str, kind: str, values: np.ndarray) -> None:
    attribute = mesh.attributes.new(name, kind, "POINT")
    key = "vector" if kind == "FLOAT_VECTOR" else "value"
    attribute.data.foreach_set(key, np.ascontiguousarray(values, np.float32).ravel())


def persistent_mesh(name: str, steps: Sequence[Gaussians]) -> bpy.types.Mesh:
    """Loose vertices at the first timestep's means, the shared parameters once and the
    means and rotations of every timestep as named attributes."""
    first = steps[0]
    mesh = bpy.data.meshes.new(name)
    mesh.vertices.add(len(first))
    mesh.vertices.foreach_set("co", np.ascontiguousarray(first.means, np.float32).ravel())
    _add_attribute(mesh, nodes.ATTR_LOG_SCALE, "FLOAT_VECTOR", first.log_scales)
    _add_attribute(mesh, nodes.ATTR_OPACITY_LOGIT, "FLOAT", first.opacity_logits)
    _add_attribute(mesh, nodes.ATTR_SH0, "FLOAT_VECTOR", first.sh0)
    if first.sh_rest is not None:
        for k in range(first.sh_rest.shape[1]):
            _add_attribute(mesh, f"gs_sh_rest_{k + 1:02d}", "FLOAT_VECTOR", first.sh_rest[:, k])
    for t, g in enumerate(steps):
        _add_attribute(mesh, f"{POSITION_PREFIX}{t}", "FLOAT_VECTOR", g.means)
        _add_attribute(mesh, f"{ROTATION_PREFIX}{t}", "QUATERNION", g.quats)
    return mesh


def _timestep_attribute(b: nodes._Builder, prefix: str, index, data_type: str):
    """The named attribute `<prefix><index>` for a computed (whole-number) index."""
    text = b.node("FunctionNodeValueToString")
    b.feed(text.inputs["Value"], index)
    text.inputs["Decimals"].default_value = 0
    head = b.node("FunctionNodeInputString", string=prefix)
    join = b.node("GeometryNodeStringJoin")
    join.inputs["Delimiter"].default_value = ""
    b.feed(join.inputs["Strings"], text.outputs["String"])  # a multi-input socket lists
    b.feed(join.inputs["Strings"], head.outputs[0])  # the link made last first
    node = b.node("GeometryNodeInputNamedAttribute", data_type=data_type)
    b.feed(node.inputs["Name"], join.outputs[0])
    return nodes._socket(node.outputs, "Attribute")


def _mix(b: nodes._Builder, data_type: str, factor, a, c):
    node = b.node("ShaderNodeMix", data_type=data_type)
    b.feed(nodes._socket(node.inputs, "Factor"), factor)
    b.feed(nodes._socket(node.inputs, "A"), a)
    b.feed(nodes._socket(node.inputs, "B"), c)
    return nodes._socket(node.outputs, "Result")


def add_timestep_picking(tree: bpy.types.GeometryNodeTree, count: int) -> None:
    """Put the timestep picking in front of the asset group's 'Settings' node: a 'Timestep'
    input (a float: fractions mix the two timesteps around it) selects the positions and
    rotations of `count` timesteps."""
    tree.interface.new_socket(TIMESTEP_INPUT, in_out="INPUT", socket_type="NodeSocketFloat")
    b = nodes._Builder(tree)
    group_in = next(n for n in tree.nodes if n.bl_idname == "NodeGroupInput")
    timestep = b.math("MINIMUM", b.math("MAXIMUM", group_in.outputs[TIMESTEP_INPUT], 0.0),
                      float(count - 1))
    first = b.math("FLOOR", timestep)
    second = b.math("MINIMUM", b.math("ADD", first, 1.0), float(count - 1))
    fraction = b.math("SUBTRACT", timestep, first)
    position = _mix(b, "VECTOR", fraction,
                    _timestep_attribute(b, POSITION_PREFIX, first, "FLOAT_VECTOR"),
                    _timestep_attribute(b, POSITION_PREFIX, second, "FLOAT_VECTOR"))
    rotation = _mix(b, "ROTATION", fraction,
                    _timestep_attribute(b, ROTATION_PREFIX, first, "QUATERNION"),
                    _timestep_attribute(b, ROTATION_PREFIX, second, "QUATERNION"))
    moved = b.node("GeometryNodeSetPosition")
    b.feed(moved.inputs["Geometry"], group_in.outputs["Geometry"])
    b.feed(moved.inputs["Position"], position)
    geometry = b.store(moved.outputs["Geometry"], nodes.ATTR_ROTATION, "QUATERNION", rotation)
    geometry = nodes._remove_attributes(b, geometry, ("gs_t_*",))
    b.feed(tree.nodes["Settings"].inputs["Geometry"], geometry)


def key_timesteps(obj: bpy.types.Object, modifier: bpy.types.Modifier,
                  frames: Sequence[int]) -> None:
    """Key the modifier's 'Timestep' input: frame of timestep t -> t, linear in between."""
    identifier = modifier.node_group.interface.items_tree[TIMESTEP_INPUT].identifier
    modifier[identifier] = 0.0
    path = f'modifiers["{modifier.name}"]["{identifier}"]'
    animation.set_keys(obj, path, list(frames), list(range(len(frames))), "LINEAR",
                       action_name=f"{obj.name} Timesteps")
