"""Per-timestep Gaussians as one animated point-cloud asset, and back.

Layout: an asset is a collection holding a root empty and one mesh object per timestep,
parented to the root. Each mesh stores its Gaussians as vertices with the raw 3DGS
parameters as point attributes (see `nodes`), written in bulk with `foreach_set`. Every
timestep object carries constant-interpolated keys on `hide_viewport` and `hide_render`, so
exactly the object of the timestep that holds the scene frame is shown: playback and renders
(Cycles, EEVEE, on a farm without this add-on) need no handler. All timestep objects share the
asset's Geometry Nodes group, whose 'Settings' node holds the display mode, the viewport
display ratio and the splat size.

A sequence whose Gaussians keep their identities (the fitting stage's persistent Gaussians:
Gaussian i is the same at every timestep) is imported with `persistent_gaussians=True` as one
object instead, whose points move from frame to frame (see `persistent`): playback swaps no
meshes and Cycles' motion blur sees the motion.

The per-timestep layout was measured against one mesh holding all T x N points whose
Geometry Nodes keep the scene frame's (100k Gaussians per timestep, 2 CPU cores, selection
only): it uses less memory (16 timesteps: +92 vs +111 MiB; 48: +276 vs +311 MiB), changes
frames in 1-2 ms instead of 8 ms (16) and 15 ms (48), since the single mesh filters all
T x N points on every frame change, and takes timesteps of different sizes and irregular
frame numbers as they come.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import bpy
import numpy as np

from . import animation, nodes, persistent
from .vendor.gaussians import Gaussians, GaussianSequence

ASSET_TAG = "fourreal_asset"
FRAME_PROP = "fourreal_frame"
SOURCE_OFFSET_PROP = "fourreal_source_offset"
LAYOUT_PROP = "fourreal_layout"  # "PER_TIMESTEP" or "PERSISTENT"


@dataclass
class PointCloudConfig:
    """How an imported asset is displayed; all of it can be changed afterwards."""

    viewport_display: str = "SPLATS"  # POINTS | SPLATS; the viewport shows what renders
    render_display: str = "SPLATS"
    viewport_ratio: float = 1.0  # fraction of Gaussians drawn in the viewport
    sigma_extent: float = 4.0  # largest proxy half-size in standard deviations
    splat_subdivisions: int = 0  # proxy: 0 a quad facing the camera, 1-3 an ico-sphere
    dilation: float = 0.3  # screen-space variance added to every splat, px^2 (3DGS: 0.3)
    antialiased: bool = False  # the dilation spreads a splat's light (gsplat's antialiased)
    blend_stored_values: bool = True  # composite the stored (sRGB) values as 3DGS does
    transparent_bounces: int = 256  # Cycles' transparent bounce limit is raised to this
    sorted_blending: bool = True  # EEVEE: sorted and blended (exact), else dithered
    eevee_samples: int = 64  # with dithered alpha EEVEE's render samples are raised to this

    def check(self) -> None:
        for name in ("viewport_display", "render_display"):
            if getattr(self, name) not in nodes.DISPLAY_MODES:
                raise ValueError(f"{name} must be one of {nodes.DISPLAY_MODES}, "
                                 f"got {getattr(self, name)!r}")
        if not 0.0 < self.viewport_ratio <= 1.0:
            raise ValueError(f"viewport_ratio must be in (0, 1], got {self.viewport_ratio}")
        if self.sigma_extent <= 0:
            raise ValueError(f"sigma_extent must be positive, got {self.sigma_extent}")
        if not 0 <= self.splat_subdivisions <= 3:
            raise ValueError("splat_subdivisions must be 0..3, got "
                             f"{self.splat_subdivisions}")
        if self.dilation < 0:
            raise ValueError(f"dilation must be >= 0, got {self.dilation}")


# ----------------------------------------------------------------------------- writing

def _add_attribute(mesh: bpy.types.Mesh, name: str, kind: str, values: np.ndarray) -> None:
    attribute = mesh.attributes.new(name, kind, "POINT")
    key = "vector" if kind == "FLOAT_VECTOR" else "value"
    attribute.data.foreach_set(key, np.ascontiguousarray(values, np.float32).ravel())


def gaussians_mesh(name: str, gaussians: Gaussians) -> bpy.types.Mesh:
    """A mesh of loose vertices at the means, with the raw parameters as attributes."""
    mesh = bpy.data.meshes.new(name)
    mesh.vertices.add(len(gaussians))
    mesh.vertices.foreach_set("co", gaussians.means.ravel())
    _add_attribute(mesh, nodes.ATTR_ROTATION, "QUATERNION", gaussians.quats)
    _add_attribute(mesh, nodes.ATTR_LOG_SCALE, "FLOAT_VECTOR", gaussians.log_scales)
    _add_attribute(mesh, nodes.ATTR_OPACITY_LOGIT, "FLOAT", gaussians.opacity_logits)
    _add_attribute(mesh, nodes.ATTR_SH0, "FLOAT_VECTOR", gaussians.sh0)
    if gaussians.sh_rest is not None:
        for k in range(gaussians.sh_rest.shape[1]):
            _add_attribute(mesh, f"gs_sh_rest_{k + 1:02d}", "FLOAT_VECTOR",
                           gaussians.sh_rest[:, k])
    return mesh


def visibility_keys(frames: Sequence[int], index: int) -> tuple[list[int], list[float]]:
    """Keys of `hide_*` for timestep `index`: shown from its frame until the next timestep's
    frame; the first timestep also before, the last also after the sequence."""
    keys = {frames[index]: 0.0}
    if index > 0:
        keys[frames[index - 1]] = 1.0
    if index + 1 < len(frames):
        keys[frames[index + 1]] = 1.0
    ordered = sorted(keys)
    return ordered, [keys[f] for f in ordered]


def _single(value) -> float:
    """A float socket's value as the float it was set from (sockets hold float32)."""
    return float(f"{value:.7g}")


_SETTING_INPUTS = (("viewport_ratio", "Viewport Ratio", _single),
                   ("sigma_extent", "Sigma Extent", _single),
                   ("splat_subdivisions", "Splat Subdivisions", int),
                   ("dilation", "Dilation", _single),
                   ("antialiased", "Antialiased", bool),
                   ("blend_stored_values", "Blend Stored Values", bool),
                   ("sorted_blending", "Sorted Blending", bool))


def apply_settings(asset: bpy.types.Object, config: PointCloudConfig) -> None:
    """Write display settings into the asset's group (every timestep follows)."""
    config.check()
    settings = asset_group_of(asset).nodes["Settings"]
    settings.inputs["Viewport Splats"].default_value = config.viewport_display == "SPLATS"
    settings.inputs["Render Splats"].default_value = config.render_display == "SPLATS"
    for field_name, input_name, _ in _SETTING_INPUTS:
        if input_name in settings.inputs:  # assets saved by older versions lack newer inputs
            settings.inputs[input_name].default_value = getattr(config, field_name)


def read_settings(asset: bpy.types.Object) -> PointCloudConfig:
    settings = asset_group_of(asset).nodes["Settings"]
    values = {field_name: kind(settings.inputs[input_name].default_value)
              for field_name, input_name, kind in _SETTING_INPUTS
              if input_name in settings.inputs}  # older assets lack newer inputs
    return PointCloudConfig(
        viewport_display="SPLATS" if settings.inputs["Viewport Splats"].default_value
        else "POINTS",
        render_display="SPLATS" if settings.inputs["Render Splats"].default_value
        else "POINTS", **values)


def scene_settings(scene: bpy.types.Scene, config: PointCloudConfig) -> list[str]:
    """Render settings the Gaussians need: Cycles' transparent bounces (and as many without
    Russian roulette), EEVEE's samples raised for dithered splats, and with
    `blend_stored_values` the Raw
    view transform, which shows the stored colours as 3DGS does (under AgX or Standard they
    would be tone-mapped or gamma-encoded twice). Returns a line per setting changed."""
    changes = []
    if scene.cycles.transparent_max_bounces < config.transparent_bounces:
        changes.append(f"Cycles transparent bounces {scene.cycles.transparent_max_bounces} "
                       f"-> {config.transparent_bounces}")
        scene.cycles.transparent_max_bounces = config.transparent_bounces
    if scene.cycles.min_transparent_bounces < config.transparent_bounces:
        changes.append(f"Cycles minimum transparent bounces "
                       f"{scene.cycles.min_transparent_bounces} -> {config.transparent_bounces} "
                       "(no random path termination inside the Gaussians: less noise)")
        scene.cycles.min_transparent_bounces = config.transparent_bounces
    if not config.sorted_blending and scene.eevee.taa_render_samples < config.eevee_samples:
        changes.append(f"EEVEE render samples {scene.eevee.taa_render_samples} -> "
                       f"{config.eevee_samples}")
        scene.eevee.taa_render_samples = config.eevee_samples
    view = scene.view_settings
    if config.blend_stored_values and (view.view_transform, view.look, view.exposure,
                                       view.gamma) != ("Raw", "None", 0.0, 1.0):
        changes.append(f"view transform {view.view_transform} -> Raw (the Gaussians' colours "
                       "are shown as stored; other objects look darker than under "
                       f"{view.view_transform})")
        view.view_transform, view.look, view.exposure, view.gamma = "Raw", "None", 0.0, 1.0
    return changes


def build_asset(scene: bpy.types.Scene, name: str, steps: Sequence[Gaussians],
                frames: Sequence[int], config: PointCloudConfig | None = None,
                source_offset: int = 0, persistent_gaussians: bool = False
                ) -> bpy.types.Object:
    """Import Gaussians per timestep as an animated asset; timestep t shows from scene frame
    `frames[t]` on. `source_offset` (scene frame - source frame number) is kept for export.
    With `persistent_gaussians` the timesteps must hold the same Gaussians (see
    `persistent.mismatch`) and become one moving point set. Returns the asset's root empty."""
    config = config or PointCloudConfig()
    config.check()
    frames = [int(f) for f in frames]
    if not steps or len(steps) != len(frames):
        raise ValueError(f"need one frame per timestep, got {len(steps)} timesteps and "
                         f"{len(frames)} frames")
    if sorted(set(frames)) != frames:
        raise ValueError(f"frames must be strictly increasing, got {frames}")
    if persistent_gaussians and len(steps) > 1 and persistent.mismatch(steps) is not None:
        t, reason = persistent.mismatch(steps)
        raise ValueError(f"not persistent Gaussians: timestep {t} has {reason}")
    persistent_gaussians = persistent_gaussians and len(steps) > 1
    collection = bpy.data.collections.new(name)
    scene.collection.children.link(collection)
    root = bpy.data.objects.new(name, None)
    root.empty_display_type = "PLAIN_AXES"
    root[ASSET_TAG] = 1
    root[SOURCE_OFFSET_PROP] = int(source_offset)
    collection.objects.link(root)
    group = nodes.asset_group(f"{root.name} Display", scene)
    root["fourreal_group"] = group
    root[LAYOUT_PROP] = "PERSISTENT" if persistent_gaussians else "PER_TIMESTEP"
    if persistent_gaussians:
        _add_persistent_object(collection, root, group, steps, frames)
    else:
        _add_timestep_objects(collection, root, group, steps, frames)
    apply_settings(root, config)
    group.nodes["Settings"].inputs["SH Degree"].default_value = max(g.sh_degree for g in steps)
    root["fourreal_scene_changes"] = "; ".join(scene_settings(scene, config))
    return root


def _add_timestep_objects(collection: bpy.types.Collection, root: bpy.types.Object,
                          group: bpy.types.GeometryNodeTree, steps: Sequence[Gaussians],
                          frames: list[int]) -> None:
    """One object per timestep, each shown from its frame until the next timestep's."""
    for t, (gaussians, frame) in enumerate(zip(steps, frames)):
        label = f"{root.name} t{t:04d}"
        obj = bpy.data.objects.new(label, gaussians_mesh(label, gaussians))
        obj[FRAME_PROP] = frame
        obj.parent = root
        collection.objects.link(obj)
        obj.modifiers.new("Gaussians", "NODES").node_group = group
        if len(frames) > 1:
            key_frames, hidden = visibility_keys(frames, t)
            for path in ("hide_viewport", "hide_render"):
                animation.set_keys(obj, path, key_frames, hidden, "CONSTANT",
                                   action_name=f"{label} Visibility")


def _add_persistent_object(collection: bpy.types.Collection, root: bpy.types.Object,
                           group: bpy.types.GeometryNodeTree, steps: Sequence[Gaussians],
                           frames: list[int]) -> bpy.types.Object:
    """The one object of a persistent asset, its timestep keyed on the modifier."""
    label = f"{root.name} Gaussians"
    obj = bpy.data.objects.new(label, persistent.persistent_mesh(label, steps))
    obj[persistent.FRAMES_PROP] = frames
    obj.parent = root
    collection.objects.link(obj)
    persistent.add_timestep_picking(group, len(steps))
    modifier = obj.modifiers.new("Gaussians", "NODES")
    modifier.node_group = group
    persistent.key_timesteps(obj, modifier, frames)
    return obj


def build_asset_from_arrays(scene: bpy.types.Scene, name: str,
                            steps: Sequence[dict[str, np.ndarray]], frames: Sequence[int],
                            config: PointCloudConfig | None = None,
                            persistent_gaussians: bool = False) -> bpy.types.Object:
    """`build_asset` from wire arrays per timestep (means, quats, log_scales, ...)."""
    return build_asset(scene, name, [Gaussians.from_arrays(dict(a)) for a in steps], frames,
                       config, persistent_gaussians=persistent_gaussians)


# ----------------------------------------------------------------------------- reading

def is_asset(obj: bpy.types.Object | None) -> bool:
    return obj is not None and obj.type == "EMPTY" and bool(obj.get(ASSET_TAG))


def asset_of(obj: bpy.types.Object | None) -> bpy.types.Object | None:
    """The asset root of `obj` (the root itself or one of its timestep objects)."""
    while obj is not None and not is_asset(obj):
        obj = obj.parent
    return obj


def asset_group_of(asset: bpy.types.Object) -> bpy.types.GeometryNodeTree:
    group = asset.get("fourreal_group")
    if group is None:
        raise ValueError(f"{asset.name!r} is not an imported Gaussian asset")
    return group


def timestep_objects(asset: bpy.types.Object) -> list[bpy.types.Object]:
    """The asset's timestep objects in frame order (none in a persistent asset)."""
    children = [c for c in asset.children if FRAME_PROP in c]
    return sorted(children, key=lambda c: int(c[FRAME_PROP]))


def persistent_object(asset: bpy.types.Object) -> bpy.types.Object | None:
    """The one object of a persistent asset, None for the per-timestep layout."""
    return next((c for c in asset.children if persistent.FRAMES_PROP in c), None)


def asset_frames(asset: bpy.types.Object) -> list[int]:
    """The scene frame of each of the asset's timesteps, in order (either layout)."""
    obj = persistent_object(asset)
    if obj is not None:
        return [int(f) for f in obj[persistent.FRAMES_PROP]]
    return [int(o[FRAME_PROP]) for o in timestep_objects(asset)]


def _read_attribute(mesh: bpy.types.Mesh, name: str, width: int) -> np.ndarray:
    attribute = mesh.attributes.get(name)
    if attribute is None:
        raise ValueError(f"mesh {mesh.name!r} has no attribute {name!r}")
    out = np.empty(len(mesh.vertices) * width, np.float32)
    attribute.data.foreach_get("vector" if attribute.data_type == "FLOAT_VECTOR" else "value",
                               out)
    return out.reshape(-1, width) if width > 1 else out


def mesh_gaussians(mesh: bpy.types.Mesh) -> Gaussians:
    """The Gaussians stored in a timestep mesh (exact: the raw parameters are kept)."""
    n = len(mesh.vertices)
    means = np.empty(n * 3, np.float32)
    mesh.vertices.foreach_get("co", means)
    rest = sorted(a.name for a in mesh.attributes if a.name.startswith("gs_sh_rest_"))
    sh_rest = (np.stack([_read_attribute(mesh, r, 3) for r in rest], axis=1) if rest
               else None)
    return Gaussians(means=means.reshape(n, 3),
                     quats=_read_attribute(mesh, nodes.ATTR_ROTATION, 4),
                     log_scales=_read_attribute(mesh, nodes.ATTR_LOG_SCALE, 3),
                     opacity_logits=_read_attribute(mesh, nodes.ATTR_OPACITY_LOGIT, 1),
                     sh0=_read_attribute(mesh, nodes.ATTR_SH0, 3), sh_rest=sh_rest)


def persistent_gaussians(mesh: bpy.types.Mesh, count: int) -> list[Gaussians]:
    """The `count` timesteps stored in a persistent asset's mesh (exact)."""
    rest = sorted(a.name for a in mesh.attributes if a.name.startswith("gs_sh_rest_"))
    sh_rest = (np.stack([_read_attribute(mesh, r, 3) for r in rest], axis=1) if rest
               else None)
    shared = {"log_scales": _read_attribute(mesh, nodes.ATTR_LOG_SCALE, 3),
              "opacity_logits": _read_attribute(mesh, nodes.ATTR_OPACITY_LOGIT, 1),
              "sh0": _read_attribute(mesh, nodes.ATTR_SH0, 3), "sh_rest": sh_rest}
    return [Gaussians(means=_read_attribute(mesh, f"{persistent.POSITION_PREFIX}{t}", 3),
                      quats=_read_attribute(mesh, f"{persistent.ROTATION_PREFIX}{t}", 4),
                      **shared) for t in range(count)]


def asset_sequence(asset: bpy.types.Object, world_space: bool = True) -> GaussianSequence:
    """The asset's Gaussians per timestep, numbered by source frame (scene frame minus the
    offset kept at import). With `world_space`, an asset that was moved has its means,
    rotations and scales transformed by its timestep objects' world matrices."""
    offset = int(asset.get(SOURCE_OFFSET_PROP, 0))
    moving = persistent_object(asset)
    if moving is not None:
        steps = persistent_gaussians(moving.data, len(moving[persistent.FRAMES_PROP]))
        if world_space:
            steps = [transformed(g, np.array(moving.matrix_world)) for g in steps]
        return GaussianSequence(steps, [f - offset for f in asset_frames(asset)])
    objects = timestep_objects(asset)
    if not objects:
        raise ValueError(f"asset {asset.name!r} has no timestep objects")
    steps = []
    for obj in objects:
        gaussians = mesh_gaussians(obj.data)
        if world_space:
            gaussians = transformed(gaussians, np.array(obj.matrix_world))
        steps.append(gaussians)
    return GaussianSequence(steps, [int(o[FRAME_PROP]) - offset for o in objects])


def transformed(gaussians: Gaussians, matrix: np.ndarray) -> Gaussians:
    """Gaussians under a similarity transform [4, 4] (rotation, uniform scale, translation).
    The identity returns the input unchanged, bit for bit. Higher SH bands are kept as they
    are (not rotated)."""
    if np.allclose(matrix, np.eye(4), atol=0, rtol=0):
        return gaussians
    linear = matrix[:3, :3]
    scale = np.cbrt(np.linalg.det(linear))
    rotation = linear / scale
    if scale <= 0 or np.abs(rotation.T @ rotation - np.eye(3)).max() > 1e-4:
        raise ValueError("only rotation, uniform scale and translation can be applied to "
                         "Gaussians; apply non-uniform scale in the 3D viewport first")
    means = gaussians.means @ linear.T + matrix[:3, 3]
    quats = _quat_multiply(_matrix_to_quat(rotation), gaussians.quats)
    return Gaussians(means=means, quats=quats, log_scales=gaussians.log_scales + np.log(scale),
                     opacity_logits=gaussians.opacity_logits, sh0=gaussians.sh0,
                     sh_rest=gaussians.sh_rest)


def _matrix_to_quat(rot: np.ndarray) -> np.ndarray:
    from mathutils import Matrix

    q = Matrix(rot.tolist()).to_quaternion()
    return np.array([q.w, q.x, q.y, q.z])


def _quat_multiply(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Hamilton product of one quaternion `a` [4] with quaternions `b` [N, 4] (wxyz)."""
    w1, x1, y1, z1 = a
    w2, x2, y2, z2 = b.T
    return np.stack([w1 * w2 - x1 * x2 - y1 * y2 - z1 * z2, w1 * x2 + x1 * w2 + y1 * z2 - z1 * y2,
                     w1 * y2 - x1 * z2 + y1 * w2 + z1 * x2, w1 * z2 + x1 * y2 - y1 * x2 + z1 * w2],
                    axis=1).astype(np.float32)
