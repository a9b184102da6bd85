"""The Geometry Nodes group and the material that display Gaussians stored as mesh vertices.

Per vertex the mesh holds the raw 3DGS parameters (`gs_rotation` quaternion wxyz,
`gs_log_scale`, `gs_opacity_logit`, `gs_sh0`; positions are the means). The group turns them
into display attributes, evaluated per frame for the visible timestep only:

    gs_color   = srgb_to_linear(max(0.5 + SH_C0 * sh0, 0))   (scene-linear emission colour)
    gs_opacity = sigmoid(opacity_logit)
    gs_scale   = exp(log_scale)                              (standard deviations per axis)
    gs_falloff = sigma_extent^2 / 2

and shows them either as points (radius sigma_extent * mean scale: fast, for the viewport) or
as splats: an ico-sphere per Gaussian rotated by the normalised quaternion and scaled by
sigma_extent * scale, realised into one mesh. The material emits gs_color with coverage

    alpha = gs_opacity * exp(-gs_falloff * (1 - (N . I)^2)) * (1 - backfacing)

which is the Gaussian's value at the ray's closest approach for a sphere of radius
sigma_extent standard deviations (exact for a sphere, close for an ellipsoid), composited
with a Transparent shader: dithered in EEVEE, enough transparent bounces in Cycles.
"""

from __future__ import annotations

import bpy

from .vendor.gaussians import SH_C0

CORE_GROUP = "FourReal Gaussians v1"
MATERIAL = "FourReal Gaussian Splat v1"
ATTR_ROTATION = "gs_rotation"
ATTR_LOG_SCALE = "gs_log_scale"
ATTR_OPACITY_LOGIT = "gs_opacity_logit"
ATTR_SH0 = "gs_sh0"
ATTR_COLOR = "gs_color"  # not "color": Cycles would show points black
ATTR_OPACITY = "gs_opacity"
ATTR_SCALE = "gs_scale"
ATTR_FALLOFF = "gs_falloff"
DISPLAY_MODES = ("POINTS", "SPLATS")
# Per-Gaussian attributes that the material does not need ("gs_sh*" also covers gs_sh_rest_NN).
RAW_ATTRIBUTES = (ATTR_ROTATION, ATTR_LOG_SCALE, ATTR_OPACITY_LOGIT, "gs_sh*", ATTR_SCALE)

# Inputs of the core group after the geometry: (name, socket type, default).
CORE_INPUTS = (
    ("Viewport Splats", "NodeSocketBool", False),
    ("Render Splats", "NodeSocketBool", True),
    ("Viewport Ratio", "NodeSocketFloat", 1.0),
    ("Sigma Extent", "NodeSocketFloat", 3.0),
    ("Splat Subdivisions", "NodeSocketInt", 1),
)


# ----------------------------------------------------------------------------- node helpers

def _socket(sockets, name: str):
    """The first enabled socket called `name` (node sockets change with their data type)."""
    for sock in sockets:
        if (sock.name == name or sock.identifier == name) and sock.enabled:
            return sock
    raise KeyError(f"no enabled socket {name!r} in {[s.name for s in sockets]}")


class _Builder:
    """Adds nodes to one tree and wires them; values may be sockets or constants."""

    def __init__(self, tree):
        self.tree = tree

    def node(self, type_name: str, **props):
        node = self.tree.nodes.new(type_name)
        for key, value in props.items():
            setattr(node, key, value)
        return node

    def feed(self, socket, value) -> None:
        if isinstance(value, bpy.types.NodeSocket):
            self.tree.links.new(value, socket)
        elif value is not None:
            socket.default_value = value

    def math(self, op: str, *values):
        node = self.node("ShaderNodeMath", operation=op)
        for sock, value in zip(node.inputs, values):
            self.feed(sock, value)
        return node.outputs[0]

    def vmath(self, op: str, *values, output: int = 0):
        node = self.node("ShaderNodeVectorMath", operation=op)
        for sock, value in zip([s for s in node.inputs if s.enabled], values):
            self.feed(sock, value)
        return node.outputs[output]

    def named(self, name: str, data_type: str):
        node = self.node("GeometryNodeInputNamedAttribute", data_type=data_type)
        node.inputs["Name"].default_value = name
        return _socket(node.outputs, "Attribute")

    def store(self, geometry, name: str, data_type: str, value):
        node = self.node("GeometryNodeStoreNamedAttribute", data_type=data_type, domain="POINT")
        self.feed(node.inputs["Geometry"], geometry)
        node.inputs["Name"].default_value = name
        self.feed(_socket(node.inputs, "Value"), value)
        return node.outputs["Geometry"]

    def separate(self, vector):
        node = self.node("ShaderNodeSeparateXYZ")
        self.feed(node.inputs[0], vector)
        return list(node.outputs)

    def combine(self, x, y, z):
        node = self.node("ShaderNodeCombineXYZ")
        for sock, value in zip(node.inputs, (x, y, z)):
            self.feed(sock, value)
        return node.outputs[0]


def _srgb_to_linear(b: _Builder, value):
    """One channel: c / 12.92 below 0.04045, ((c + 0.055) / 1.055)^2.4 above."""
    low = b.math("DIVIDE", value, 12.92)
    high = b.math("POWER", b.math("MULTIPLY_ADD", value, 1 / 1.055, 0.055 / 1.055), 2.4)
    is_low = b.math("LESS_THAN", value, 0.04045)
    return b.math("MULTIPLY_ADD", is_low, b.math("SUBTRACT", low, high), high)


# ----------------------------------------------------------------------------- core group

def _activations(b: _Builder, geometry, sigma_extent):
    """Store gs_color, gs_opacity, gs_scale and gs_falloff on the points."""
    color = b.vmath("MULTIPLY_ADD", b.named(ATTR_SH0, "FLOAT_VECTOR"),
                    (SH_C0, SH_C0, SH_C0), (0.5, 0.5, 0.5))
    channels = [_srgb_to_linear(b, b.math("MAXIMUM", c, 0.0)) for c in b.separate(color)]
    geometry = b.store(geometry, ATTR_COLOR, "FLOAT_COLOR", b.combine(*channels))
    logit = b.named(ATTR_OPACITY_LOGIT, "FLOAT")
    opacity = b.math("DIVIDE", 1.0, b.math("ADD", 1.0, b.math("EXPONENT",
                                                              b.math("MULTIPLY", logit, -1.0))))
    geometry = b.store(geometry, ATTR_OPACITY, "FLOAT", opacity)
    scale = b.combine(*[b.math("EXPONENT", c)
                        for c in b.separate(b.named(ATTR_LOG_SCALE, "FLOAT_VECTOR"))])
    geometry = b.store(geometry, ATTR_SCALE, "FLOAT_VECTOR", scale)
    falloff = b.math("MULTIPLY", b.math("MULTIPLY", sigma_extent, sigma_extent), 0.5)
    return b.store(geometry, ATTR_FALLOFF, "FLOAT", falloff), scale


def _decimate(b: _Builder, geometry, ratio):
    """In the viewport keep a seeded random fraction `ratio` of the points; renders keep all."""
    keep = b.node("FunctionNodeRandomValue", data_type="BOOLEAN")
    b.feed(_socket(keep.inputs, "Probability"), ratio)
    drop = b.node("FunctionNodeBooleanMath", operation="NIMPLY")
    b.feed(drop.inputs[0], b.node("GeometryNodeIsViewport").outputs[0])
    b.feed(drop.inputs[1], _socket(keep.outputs, "Value"))
    delete = b.node("GeometryNodeDeleteGeometry", domain="POINT")
    b.feed(delete.inputs["Geometry"], geometry)
    b.feed(delete.inputs["Selection"], drop.outputs[0])
    return delete.outputs[0]


def _splats(b: _Builder, points, scale, sigma_extent, subdivisions):
    sphere = b.node("GeometryNodeMeshIcoSphere")
    sphere.inputs["Radius"].default_value = 1.0
    b.feed(sphere.inputs["Subdivisions"], subdivisions)
    smooth = b.node("GeometryNodeSetShadeSmooth")
    b.feed(smooth.inputs[0], sphere.outputs["Mesh"])
    quat = b.node("FunctionNodeRotationToQuaternion")
    b.feed(quat.inputs[0], b.named(ATTR_ROTATION, "QUATERNION"))
    rotation = b.node("FunctionNodeQuaternionToRotation")  # normalises the quaternion
    for sock, out in zip(rotation.inputs, quat.outputs):
        b.feed(sock, out)
    inst = b.node("GeometryNodeInstanceOnPoints")
    b.feed(inst.inputs["Points"], points)
    b.feed(inst.inputs["Instance"], smooth.outputs[0])
    b.feed(inst.inputs["Rotation"], rotation.outputs[0])
    b.feed(inst.inputs["Scale"], b.vmath("SCALE", scale, sigma_extent))
    realize = b.node("GeometryNodeRealizeInstances")
    b.feed(realize.inputs["Geometry"], _remove_attributes(b, inst.outputs[0], RAW_ATTRIBUTES))
    return realize.outputs[0]


def _remove_attributes(b: _Builder, geometry, names: tuple[str, ...]):
    """Drop attributes the material does not read, so realising copies less."""
    for name in names:
        node = b.node("GeometryNodeRemoveAttribute")
        b.feed(node.inputs["Geometry"], geometry)
        node.inputs["Name"].default_value = name
        if "*" in name:
            if "Pattern Mode" in node.inputs:  # Blender 4.4+: a menu socket
                node.inputs["Pattern Mode"].default_value = "Wildcard"
            else:
                node.pattern_mode = "WILDCARD"
        geometry = node.outputs[0]
    return geometry


def _points(b: _Builder, geometry, scale, sigma_extent):
    mean_scale = b.math("DIVIDE", b.vmath("DOT_PRODUCT", scale, (1.0, 1.0, 1.0), output=1), 3.0)
    to_points = b.node("GeometryNodeMeshToPoints")
    b.feed(to_points.inputs["Mesh"], geometry)
    b.feed(to_points.inputs["Radius"], b.math("MULTIPLY", mean_scale, sigma_extent))
    return to_points.outputs[0]


def build_core_group(material: bpy.types.Material) -> bpy.types.GeometryNodeTree:
    """The shared group: decimate (viewport), activate, then points or splats."""
    tree = bpy.data.node_groups.new(CORE_GROUP, "GeometryNodeTree")
    tree.interface.new_socket("Geometry", in_out="INPUT", socket_type="NodeSocketGeometry")
    for name, socket_type, default in CORE_INPUTS:
        item = tree.interface.new_socket(name, in_out="INPUT", socket_type=socket_type)
        item.default_value = default
    tree.interface.new_socket("Geometry", in_out="OUTPUT", socket_type="NodeSocketGeometry")
    b = _Builder(tree)
    group_in = b.node("NodeGroupInput")
    args = {name: group_in.outputs[name] for name, _, _ in CORE_INPUTS}
    kept = _decimate(b, group_in.outputs["Geometry"], args["Viewport Ratio"])
    active, scale = _activations(b, kept, args["Sigma Extent"])
    splats = _splats(b, active, scale, args["Sigma Extent"], args["Splat Subdivisions"])
    points = _points(b, active, scale, args["Sigma Extent"])
    is_viewport = b.node("GeometryNodeIsViewport").outputs[0]
    use_splats = b.node("GeometryNodeSwitch", input_type="BOOLEAN")
    b.feed(_socket(use_splats.inputs, "Switch"), is_viewport)
    b.feed(_socket(use_splats.inputs, "False"), args["Render Splats"])
    b.feed(_socket(use_splats.inputs, "True"), args["Viewport Splats"])
    switch = b.node("GeometryNodeSwitch", input_type="GEOMETRY")
    b.feed(_socket(switch.inputs, "Switch"), use_splats.outputs[0])
    b.feed(_socket(switch.inputs, "False"), points)
    b.feed(_socket(switch.inputs, "True"), splats)
    set_material = b.node("GeometryNodeSetMaterial")
    b.feed(set_material.inputs["Geometry"], switch.outputs[0])
    set_material.inputs["Material"].default_value = material
    b.feed(b.node("NodeGroupOutput").inputs[0], set_material.outputs[0])
    return tree


def core_group() -> bpy.types.GeometryNodeTree:
    """The core group, built on first use and shared by every imported asset."""
    tree = bpy.data.node_groups.get(CORE_GROUP)
    return tree if tree is not None else build_core_group(splat_material())


def asset_group(name: str) -> bpy.types.GeometryNodeTree:
    """A per-asset group wrapping the core group: the asset's display settings live on its
    'Settings' node, so one edit updates every timestep object of the asset."""
    tree = bpy.data.node_groups.new(name, "GeometryNodeTree")
    tree.interface.new_socket("Geometry", in_out="INPUT", socket_type="NodeSocketGeometry")
    tree.interface.new_socket("Geometry", in_out="OUTPUT", socket_type="NodeSocketGeometry")
    b = _Builder(tree)
    settings = b.node("GeometryNodeGroup", name="Settings", node_tree=core_group())
    b.feed(settings.inputs["Geometry"], b.node("NodeGroupInput").outputs[0])
    b.feed(b.node("NodeGroupOutput").inputs[0], settings.outputs[0])
    return tree


# ----------------------------------------------------------------------------- material

def build_splat_material() -> bpy.types.Material:
    material = bpy.data.materials.new(MATERIAL)
    if bpy.app.version < (5, 0, 0):  # always true from 5.0 on
        material.use_nodes = True
    tree = material.node_tree
    tree.nodes.clear()
    b = _Builder(tree)
    color = b.node("ShaderNodeAttribute", attribute_name=ATTR_COLOR, attribute_type="GEOMETRY")
    opacity = b.node("ShaderNodeAttribute", attribute_name=ATTR_OPACITY,
                     attribute_type="GEOMETRY")
    falloff = b.node("ShaderNodeAttribute", attribute_name=ATTR_FALLOFF,
                     attribute_type="GEOMETRY")
    geometry = b.node("ShaderNodeNewGeometry")
    facing = b.vmath("DOT_PRODUCT", geometry.outputs["Normal"], geometry.outputs["Incoming"],
                     output=1)
    edge = b.math("SUBTRACT", 1.0, b.math("MULTIPLY", facing, facing))
    gauss = b.math("EXPONENT", b.math("MULTIPLY", b.math("MULTIPLY", edge, -1.0),
                                      falloff.outputs["Fac"]))
    front = b.math("SUBTRACT", 1.0, geometry.outputs["Backfacing"])
    alpha = b.math("MULTIPLY", b.math("MULTIPLY", gauss, opacity.outputs["Fac"]), front)
    emission = b.node("ShaderNodeEmission")
    b.feed(emission.inputs["Color"], color.outputs["Color"])
    emission.inputs["Strength"].default_value = 1.0
    mix = b.node("ShaderNodeMixShader")
    b.feed(mix.inputs[0], alpha)
    b.feed(mix.inputs[1], b.node("ShaderNodeBsdfTransparent").outputs[0])
    b.feed(mix.inputs[2], emission.outputs[0])
    b.feed(b.node("ShaderNodeOutputMaterial").inputs["Surface"], mix.outputs[0])
    _set_transparency(material)
    return material


def _set_transparency(material: bpy.types.Material) -> None:
    """Dithered (stochastic) transparency in EEVEE, on every Blender version we support."""
    if hasattr(material, "surface_render_method"):  # EEVEE Next (4.2+)
        material.surface_render_method = "DITHERED"
    if hasattr(material, "blend_method"):
        material.blend_method = "HASHED"
    if hasattr(material, "use_transparent_shadow"):
        material.use_transparent_shadow = True
    material.use_backface_culling = False


def splat_material() -> bpy.types.Material:
    material = bpy.data.materials.get(MATERIAL)
    return material if material is not None else build_splat_material()
