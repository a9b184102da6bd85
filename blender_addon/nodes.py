"""The Geometry Nodes group and the material that display Gaussians stored as mesh vertices.

Per vertex the mesh holds the raw 3DGS parameters (`gs_rotation` quaternion wxyz,
`gs_log_scale`, `gs_opacity_logit`, `gs_sh0`, optionally `gs_sh_rest_01..15`; positions are
the means). The group turns them into what a 3DGS rasterizer draws, per frame and for the
visible timestep only, in the asset's local space:

    gs_opacity  = sigmoid(opacity_logit)          (Gaussians below 1/255 are dropped)
    gs_scale    = sqrt(exp(log_scale)^2 + d^2)     d = sqrt(Dilation) * pixel size at the mean
    gs_color    = max(SH(view direction), 0)       the stored (sRGB) values, 3DGS' SH maths
    gs_mean, gs_whiten_0..2 = mu and the whitening rows W[k] = R[:, k] / gs_scale[k]

The dilation is the 0.3 px^2 screen-space low-pass of 3DGS rasterizers: an isotropic 3D
variance d^2 whose projection adds `Dilation` px^2, with the pixel size taken from the active
camera (its projection matrix) and the render width (`Render Width`, driven by the scene's
resolution). The view direction of the SH is the active camera's, per Gaussian, as 3DGS does.

Each Gaussian is drawn on a bounding proxy: a box (or an ico-sphere) around the ellipsoid
where alpha falls below 1/255 (k = sqrt(2 ln(255 opacity)) standard deviations), or a point
(sphere) of radius k * max scale. The material evaluates the Gaussian exactly along each view
ray: with p = W (P - mu) and v = W I,

    alpha = min(opacity * exp(-(|p|^2 - (p.v)^2 / |v|^2) / 2), 0.99)

which is the ray's maximum of the Gaussian, the same value as 3DGS' projected 2D Gaussian,
zero below 1/255 and on back faces, and composites the emission with a Transparent shader.
Cycles crosses the proxies in ray order (transparent bounces). For EEVEE the Gaussians are
sorted back to front by the depth of their means from the active camera, the order 3DGS
composites in, and drawn with the Blended render method, which blends a mesh's faces in
index order: one sample gives the exact picture. `Sorted Blending` off, or motion blur on in
the scene (which pairs vertices by index across subframes, so the Gaussians keep their
identity order), uses the Dithered method instead (order-independent, grain that falls with
the sample count). Emitting the
stored values makes them blend as 3DGS blends them; `scene_settings` sets the Raw view
transform to show them as is.
"""

from __future__ import annotations

import math

import bpy

from .vendor.gaussians import SH_C0

CORE_GROUP = "FourReal Gaussians v5"
MATERIAL = "FourReal Gaussian Splat v4"  # Blended in EEVEE
MATERIAL_DITHERED = "FourReal Gaussian Splat v4 Dithered"
ATTR_ROTATION = "gs_rotation"
ATTR_LOG_SCALE = "gs_log_scale"
ATTR_OPACITY_LOGIT = "gs_opacity_logit"
ATTR_SH0 = "gs_sh0"
ATTR_COLOR = "gs_color"  # not "color": Cycles would show points black
ATTR_OPACITY = "gs_opacity"
ATTR_SCALE = "gs_scale"
ATTR_MEAN = "gs_mean"
ATTR_OFFSET = "gs_offset"  # proxy corners: position - mean (see `_splats`)
ATTR_WHITEN = ("gs_whiten_0", "gs_whiten_1", "gs_whiten_2")
DISPLAY_MODES = ("POINTS", "SPLATS")
ALPHA_MIN = 1.0 / 255.0
ALPHA_MAX = 0.99
# Per-Gaussian attributes that the material does not need ("gs_sh*" also covers gs_sh_rest_NN).
RAW_ATTRIBUTES = (ATTR_ROTATION, ATTR_LOG_SCALE, ATTR_OPACITY_LOGIT, "gs_sh*", ATTR_SCALE)
# Distance from the centre to the nearest face of a unit ico-sphere of 1, 2, 3 subdivisions.
ICO_INRADIUS = (0.7946436, 0.9341711, 0.9822465)
QUAD_MARGIN = 1.1  # rays diverge a little across a quad: it is made this much larger

# Inputs of the core group after the geometry: (name, socket type, default).
CORE_INPUTS = (
    ("Viewport Splats", "NodeSocketBool", True),
    ("Render Splats", "NodeSocketBool", True),
    ("Viewport Ratio", "NodeSocketFloat", 1.0),
    ("Sigma Extent", "NodeSocketFloat", 4.0),  # largest proxy half-size in std devs
    ("Splat Subdivisions", "NodeSocketInt", 0),  # 0: camera-facing quad, 1-3: ico-sphere
    ("Render Width", "NodeSocketFloat", 1920.0),  # pixels across (driven by the scene)
    ("Dilation", "NodeSocketFloat", 0.3),  # screen-space variance in px^2
    ("SH Degree", "NodeSocketInt", 0),
    ("Blend Stored Values", "NodeSocketBool", True),  # False: emit linearised colours
    ("Sorted Blending", "NodeSocketBool", True),  # False: EEVEE's dithered transparency
    ("Motion Blur", "NodeSocketBool", False),  # driven by the scene: keep identity order
    ("Antialiased", "NodeSocketBool", False),  # the dilation spreads light (gsplat's mode)
)

# Real SH basis constants and terms (3DGS / gsplat convention), degree 1..3.
SH_C1 = 0.4886025119029199
SH_C2 = (1.0925484305920792, -1.0925484305920792, 0.31539156525252005, -1.0925484305920792,
         0.5462742152960396)
SH_C3 = (-0.5900435899266435, 2.890611442640554, -0.4570457994644658, 0.3731763325901154,
         -0.4570457994644658, 1.445305721320277, -0.5900435899266435)


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

    def mul(self, *values):
        out = values[0]
        for value in values[1:]:
            out = self.math("MULTIPLY", out, value)
        return out

    def vmath(self, op: str, *values, output: int = 0):
        node = self.node("ShaderNodeVectorMath", operation=op)
        for sock, value in zip([s for s in node.inputs if s.enabled], values):
            self.feed(sock, value)
        return node.outputs[output]

    def dot(self, a, b):
        return self.vmath("DOT_PRODUCT", a, b, output=1)

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

    def switch(self, input_type: str, condition, if_false, if_true):
        node = self.node("GeometryNodeSwitch", input_type=input_type)
        self.feed(_socket(node.inputs, "Switch"), condition)
        self.feed(_socket(node.inputs, "False"), if_false)
        self.feed(_socket(node.inputs, "True"), if_true)
        return node.outputs[0]

    def delete(self, geometry, selection):
        node = self.node("GeometryNodeDeleteGeometry", domain="POINT")
        self.feed(node.inputs["Geometry"], geometry)
        self.feed(node.inputs["Selection"], selection)
        return node.outputs[0]


def _srgb_to_linear(b: _Builder, value):
    """One channel: c / 12.92 below 0.04045, ((c + 0.055) / 1.055)^2.4 above."""
    low = b.math("DIVIDE", value, 12.92)
    high = b.math("POWER", b.math("MULTIPLY_ADD", value, 1 / 1.055, 0.055 / 1.055), 2.4)
    is_low = b.math("LESS_THAN", value, 0.04045)
    return b.math("MULTIPLY_ADD", is_low, b.math("SUBTRACT", low, high), high)


# ----------------------------------------------------------------------------- core group

def _camera(b: _Builder, render_width) -> dict:
    """The active camera in the asset's space: position, unit axes (right, up, view), its
    rotation, the pixel size at unit depth (at any depth when orthographic) and whether it
    is orthographic."""
    active = b.node("GeometryNodeInputActiveCamera").outputs[0]
    info = b.node("GeometryNodeObjectInfo", transform_space="RELATIVE")
    b.feed(info.inputs["Object"], active)
    camera = b.node("GeometryNodeCameraInfo")
    b.feed(camera.inputs["Camera"], active)
    axes = []
    for direction in ((1.0, 0.0, 0.0), (0.0, 1.0, 0.0), (0.0, 0.0, -1.0)):
        node = b.node("FunctionNodeTransformDirection")
        node.inputs["Direction"].default_value = direction
        b.feed(node.inputs["Transform"], info.outputs["Transform"])
        axes.append(b.vmath("NORMALIZE", node.outputs[0]))
    p00 = b.node("FunctionNodeSeparateMatrix")
    b.feed(p00.inputs[0], camera.outputs["Projection Matrix"])
    # NDC spans 2 over `render_width` pixels; x_ndc = P00 x / depth (DIVIDE gives 0 for 0).
    pixel = b.math("DIVIDE", 2.0, b.mul(p00.outputs[0], render_width))
    return {"position": info.outputs["Location"], "right": axes[0], "up": axes[1],
            "view": axes[2], "rotation": info.outputs["Rotation"], "pixel": pixel,
            "orthographic": camera.outputs["Is Orthographic"]}


def _sh_basis(b: _Builder, direction) -> list:
    """The 15 real SH basis values of degrees 1..3 at a unit direction (3DGS' order)."""
    x, y, z = b.separate(direction)
    xx, yy, zz = b.mul(x, x), b.mul(y, y), b.mul(z, z)
    xy, yz, xz = b.mul(x, y), b.mul(y, z), b.mul(x, z)
    x2y2 = b.math("ADD", xx, yy)
    basis = [b.mul(-SH_C1, y), b.mul(SH_C1, z), b.mul(-SH_C1, x),
             b.mul(SH_C2[0], xy), b.mul(SH_C2[1], yz),
             b.mul(SH_C2[2], b.math("SUBTRACT", b.mul(2.0, zz), x2y2)),
             b.mul(SH_C2[3], xz), b.mul(SH_C2[4], b.math("SUBTRACT", xx, yy))]
    four_zz = b.math("SUBTRACT", b.mul(4.0, zz), x2y2)
    basis += [b.mul(SH_C3[0], y, b.math("SUBTRACT", b.mul(3.0, xx), yy)),
              b.mul(SH_C3[1], xy, z),
              b.mul(SH_C3[2], y, four_zz),
              b.mul(SH_C3[3], z, b.math("SUBTRACT", b.mul(2.0, zz), b.mul(3.0, x2y2))),
              b.mul(SH_C3[4], x, four_zz),
              b.mul(SH_C3[5], z, b.math("SUBTRACT", xx, yy)),
              b.mul(SH_C3[6], x, b.math("SUBTRACT", xx, b.mul(3.0, yy)))]
    return basis


def _color(b: _Builder, camera_position, degree, blend_stored):
    """gs_color: 0.5 + SH_C0 sh0 (+ the higher bands seen from the camera), clamped at 0;
    linearised unless the stored values are blended as they are."""
    dc = b.vmath("MULTIPLY_ADD", b.named(ATTR_SH0, "FLOAT_VECTOR"),
                 (SH_C0, SH_C0, SH_C0), (0.5, 0.5, 0.5))
    position = b.node("GeometryNodeInputPosition").outputs[0]
    direction = b.vmath("NORMALIZE", b.vmath("SUBTRACT", position, camera_position))
    by_degree = b.node("GeometryNodeIndexSwitch", data_type="VECTOR")
    while len(by_degree.index_switch_items) < 4:
        by_degree.index_switch_items.new()
    b.feed(by_degree.inputs["Index"], b.math("MINIMUM", degree, 3))
    b.feed(by_degree.inputs[1], dc)
    total = dc
    for k, value in enumerate(_sh_basis(b, direction), start=1):
        coeff = b.named(f"gs_sh_rest_{k:02d}", "FLOAT_VECTOR")
        total = b.vmath("MULTIPLY_ADD", coeff, b.combine(value, value, value), total)
        if k in (3, 8, 15):  # the last term of degree 1, 2, 3
            b.feed(by_degree.inputs[{3: 2, 8: 3, 15: 4}[k]], total)
    color = by_degree.outputs[0]
    stored = [b.math("MAXIMUM", c, 0.0) for c in b.separate(color)]
    linear = b.combine(*[_srgb_to_linear(b, c) for c in stored])
    return b.switch("VECTOR", blend_stored, linear, b.combine(*stored))


def _rotation(b: _Builder):
    quat = b.node("FunctionNodeRotationToQuaternion")
    b.feed(quat.inputs[0], b.named(ATTR_ROTATION, "QUATERNION"))
    rotation = b.node("FunctionNodeQuaternionToRotation")  # normalises the quaternion
    for sock, out in zip(rotation.inputs, quat.outputs):
        b.feed(sock, out)
    return rotation.outputs[0]


def _antialiasing(b: _Builder, raw, dilated, axes, towards):
    """gsplat's antialiasing factor sqrt(det(S) / det(S + blur)) of a splat's footprint S,
    with the dilation in 3D: for a unit direction v (camera to mean) the footprint across v
    of a covariance C = R diag(s^2) R^T has det(C) v^T C^-1 v = prod(s^2) sum_k (a_k / s_k)^2,
    a_k = R[:, k] . v, so the factor is prod(s / s') sqrt(sum (a_k / s_k)^2 /
    sum (a_k / s'_k)^2) with s the scales and s' the dilated ones."""
    wide = b.separate(dilated)
    shrink = b.mul(*[b.math("DIVIDE", s, w) for s, w in zip(raw, wide)])

    def across(scales):
        terms = [b.math("DIVIDE", b.dot(axis, towards), s) for axis, s in zip(axes, scales)]
        return b.math("ADD", b.math("ADD", b.mul(terms[0], terms[0]), b.mul(terms[1], terms[1])),
                      b.mul(terms[2], terms[2]))

    return b.mul(shrink, b.math("SQRT", b.math("DIVIDE", across(raw), across(wide))))


def _activations(b: _Builder, geometry, args) -> tuple:
    """Drop Gaussians under 1/255 opacity or behind the camera; store colour, opacity, the
    dilated scales, the mean and the whitening rows. Returns the geometry and a dict of
    fields: scale, extent (proxy half-size in standard deviations), rotation, axes (the
    rotated unit axes R[:, k]), camera."""
    logit = b.named(ATTR_OPACITY_LOGIT, "FLOAT")
    opacity = b.math("DIVIDE", 1.0, b.math("ADD", 1.0, b.math("EXPONENT", b.mul(logit, -1.0))))
    geometry = b.delete(geometry, b.math("LESS_THAN", opacity, ALPHA_MIN))
    camera = _camera(b, args["Render Width"])
    position = b.node("GeometryNodeInputPosition").outputs[0]
    depth = b.dot(b.vmath("SUBTRACT", position, camera["position"]), camera["view"])
    dilation = b.mul(b.math("SQRT", args["Dilation"]), camera["pixel"],
                     b.switch("FLOAT", camera["orthographic"], b.math("ABSOLUTE", depth), 1.0))
    variance = b.mul(dilation, dilation)
    raw = [b.math("EXPONENT", c) for c in b.separate(b.named(ATTR_LOG_SCALE, "FLOAT_VECTOR"))]
    scale = b.combine(*[b.math("SQRT", b.math("MULTIPLY_ADD", s, s, variance)) for s in raw])
    color = _color(b, camera["position"], args["SH Degree"], args["Blend Stored Values"])
    rotation = _rotation(b)
    axes = []
    for k in range(3):
        rotate = b.node("FunctionNodeRotateVector")
        rotate.inputs["Vector"].default_value = [float(i == k) for i in range(3)]
        b.feed(rotate.inputs["Rotation"], rotation)
        axes.append(rotate.outputs[0])
    towards = b.switch("VECTOR", camera["orthographic"],
                       b.vmath("NORMALIZE", b.vmath("SUBTRACT", position, camera["position"])),
                       camera["view"])
    compensation = _antialiasing(b, raw, scale, axes, towards)
    opacity = b.switch("FLOAT", args["Antialiased"], opacity, b.mul(opacity, compensation))
    geometry = b.store(geometry, ATTR_COLOR, "FLOAT_COLOR", color)
    geometry = b.store(geometry, ATTR_OPACITY, "FLOAT", opacity)
    geometry = b.store(geometry, ATTR_SCALE, "FLOAT_VECTOR", scale)
    geometry = b.store(geometry, ATTR_MEAN, "FLOAT_VECTOR", position)
    for name, axis, s in zip(ATTR_WHITEN, axes, b.separate(scale)):
        geometry = b.store(geometry, name, "FLOAT_VECTOR",
                           b.vmath("SCALE", axis, b.math("DIVIDE", 1.0, s)))
    extent = b.math("SQRT", b.mul(2.0, b.math("LOGARITHM", b.mul(opacity, 255.0), math.e)))
    extent = b.math("MINIMUM", extent, args["Sigma Extent"])
    return geometry, {"scale": scale, "extent": extent, "rotation": rotation, "axes": axes,
                      "camera": camera, "depth": depth}


def _decimate(b: _Builder, geometry, ratio):
    """In the viewport keep a seeded random fraction `ratio` of the points; renders keep all."""
    keep = b.node("FunctionNodeRandomValue", data_type="BOOLEAN")
    b.feed(_socket(keep.inputs, "Probability"), ratio)
    drop = b.node("FunctionNodeBooleanMath", operation="NIMPLY")
    b.feed(drop.inputs[0], b.node("GeometryNodeIsViewport").outputs[0])
    b.feed(drop.inputs[1], _socket(keep.outputs, "Value"))
    return b.delete(geometry, drop.outputs[0])


def _ico_spheres(b: _Builder, points, fields, subdivisions):
    """An ico-sphere per Gaussian holding its ellipsoid out to `extent` standard deviations
    (view-independent: right from any viewpoint, composited in hit order)."""
    sphere = b.node("GeometryNodeMeshIcoSphere")
    sphere.inputs["Radius"].default_value = 1.0
    b.feed(sphere.inputs["Subdivisions"], subdivisions)
    inradius = b.node("GeometryNodeIndexSwitch", data_type="FLOAT")
    while len(inradius.index_switch_items) < len(ICO_INRADIUS):
        inradius.index_switch_items.new()
    b.feed(inradius.inputs["Index"], b.math("SUBTRACT", subdivisions, 1))
    for k, value in enumerate(ICO_INRADIUS):
        inradius.inputs[k + 1].default_value = value
    inst = b.node("GeometryNodeInstanceOnPoints")
    b.feed(inst.inputs["Points"], points)
    b.feed(inst.inputs["Instance"], sphere.outputs["Mesh"])
    b.feed(inst.inputs["Rotation"], fields["rotation"])
    b.feed(inst.inputs["Scale"], b.vmath("SCALE", fields["scale"],
                                         b.math("DIVIDE", fields["extent"], inradius.outputs[0])))
    return inst.outputs[0]


def _shadow_half_width(b: _Builder, fields, axis, ray):
    """Half-width along the quad's in-plane `axis` of the ellipsoid's shadow cast along
    `ray` onto the plane facing the camera: k sqrt(a^T Sigma a), a = axis - view (axis.ray)
    / (view.ray)."""
    view = fields["camera"]["view"]
    cosine = b.math("MAXIMUM", b.dot(view, ray), 0.05)
    a = b.vmath("SUBTRACT", axis, b.vmath("SCALE", view, b.math("DIVIDE", b.dot(axis, ray),
                                                                  cosine)))
    terms = [b.mul(s, b.dot(col, a)) for s, col in zip(b.separate(fields["scale"]),
                                                       fields["axes"])]
    sigma = b.math("SQRT", b.dot(b.combine(*terms), b.combine(*terms)))
    return b.mul(sigma, fields["extent"], QUAD_MARGIN)


def _quads(b: _Builder, points, fields):
    """A quad per Gaussian through its mean, facing the active camera, bounding its shadow:
    rays cross the quads in the order of the means' camera depth, the order 3DGS sorts by."""
    camera = fields["camera"]
    points = b.delete(points, b.math("LESS_THAN", fields["depth"], 0.0))
    position = b.node("GeometryNodeInputPosition").outputs[0]
    toward = b.vmath("NORMALIZE", b.vmath("SUBTRACT", position, camera["position"]))
    ray = b.switch("VECTOR", camera["orthographic"], toward, camera["view"])
    grid = b.node("GeometryNodeMeshGrid")
    for name, value in (("Size X", 2.0), ("Size Y", 2.0), ("Vertices X", 2), ("Vertices Y", 2)):
        grid.inputs[name].default_value = value
    inst = b.node("GeometryNodeInstanceOnPoints")
    b.feed(inst.inputs["Points"], points)
    b.feed(inst.inputs["Instance"], grid.outputs["Mesh"])
    b.feed(inst.inputs["Rotation"], camera["rotation"])
    b.feed(inst.inputs["Scale"], b.combine(_shadow_half_width(b, fields, camera["right"], ray),
                                           _shadow_half_width(b, fields, camera["up"], ray),
                                           1.0))
    return inst.outputs[0]


def _splats(b: _Builder, points, fields, subdivisions):
    """Quads for 0 subdivisions, else ico-spheres; realised into one mesh."""
    use_spheres = b.math("GREATER_THAN", subdivisions, 0.5)
    instances = b.switch("GEOMETRY", use_spheres, _quads(b, points, fields),
                         _ico_spheres(b, points, fields, b.math("MINIMUM", subdivisions, 3)))
    realize = b.node("GeometryNodeRealizeInstances")
    # After instancing: the fields above read the raw attributes.
    b.feed(realize.inputs["Geometry"], _remove_attributes(b, instances, RAW_ATTRIBUTES))
    # Each corner's offset from its mean: interpolated over a face it is P - mu at any hit,
    # also where motion blur moves the face (the vertices move, the mean attribute cannot).
    position = b.node("GeometryNodeInputPosition").outputs[0]
    offset = b.vmath("SUBTRACT", position, b.named(ATTR_MEAN, "FLOAT_VECTOR"))
    return b.store(realize.outputs[0], ATTR_OFFSET, "FLOAT_VECTOR", offset)


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


def _points(b: _Builder, geometry, fields):
    """A point (a sphere in Cycles) of radius `extent` times the largest scale per Gaussian."""
    x, y, z = b.separate(fields["scale"])
    largest = b.math("MAXIMUM", x, b.math("MAXIMUM", y, z))
    to_points = b.node("GeometryNodeMeshToPoints")
    b.feed(to_points.inputs["Mesh"], geometry)
    b.feed(to_points.inputs["Radius"], b.mul(largest, fields["extent"]))
    return _remove_attributes(b, to_points.outputs[0], RAW_ATTRIBUTES)


def _sort_back_to_front(b: _Builder, geometry, fields, enabled):
    """With `enabled`, the points in decreasing depth of their means from the active camera
    (3DGS' compositing order, back to front for blending); the proxies and realised faces
    keep this order."""
    sort = b.node("GeometryNodeSortElements", domain="POINT")
    b.feed(sort.inputs["Geometry"], geometry)
    b.feed(sort.inputs["Sort Weight"], b.mul(fields["depth"], -1.0))
    return b.switch("GEOMETRY", enabled, geometry, sort.outputs[0])


def build_core_group(material: bpy.types.Material,
                     dithered: bpy.types.Material) -> bpy.types.GeometryNodeTree:
    """The shared group: decimate (viewport), activate and dilate, sort for blending, then
    points or splats with the blended or the dithered material."""
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
    active, fields = _activations(b, kept, args)
    # Motion blur pairs vertices by index across (sub)frames: no sorting then, dithered.
    blending = b.node("FunctionNodeBooleanMath", operation="NIMPLY")
    b.feed(blending.inputs[0], args["Sorted Blending"])
    b.feed(blending.inputs[1], args["Motion Blur"])
    blending = blending.outputs[0]
    active = _sort_back_to_front(b, active, fields, blending)
    splats = _splats(b, active, fields, args["Splat Subdivisions"])
    points = _points(b, active, fields)
    is_viewport = b.node("GeometryNodeIsViewport").outputs[0]
    use_splats = b.switch("BOOLEAN", is_viewport, args["Render Splats"], args["Viewport Splats"])
    shown = b.switch("GEOMETRY", use_splats, points, splats)
    set_material = b.node("GeometryNodeSetMaterial")
    b.feed(set_material.inputs["Geometry"], shown)
    b.feed(set_material.inputs["Material"],
           b.switch("MATERIAL", blending, dithered, material))
    b.feed(b.node("NodeGroupOutput").inputs[0], set_material.outputs[0])
    return tree


def core_group() -> bpy.types.GeometryNodeTree:
    """The core group, built on first use and shared by every imported asset."""
    tree = bpy.data.node_groups.get(CORE_GROUP)
    return tree if tree is not None else build_core_group(splat_material(),
                                                          splat_material(dithered=True))


def asset_group(name: str, scene: bpy.types.Scene | None = None) -> bpy.types.GeometryNodeTree:
    """A per-asset group wrapping the core group: the asset's display settings live on its
    'Settings' node, so one edit updates every timestep object of the asset. With a scene,
    'Render Width' and 'Motion Blur' follow the scene through drivers."""
    tree = bpy.data.node_groups.new(name, "GeometryNodeTree")
    tree.interface.new_socket("Geometry", in_out="INPUT", socket_type="NodeSocketGeometry")
    tree.interface.new_socket("Geometry", in_out="OUTPUT", socket_type="NodeSocketGeometry")
    b = _Builder(tree)
    settings = b.node("GeometryNodeGroup", name="Settings", node_tree=core_group())
    b.feed(settings.inputs["Geometry"], b.node("NodeGroupInput").outputs[0])
    b.feed(b.node("NodeGroupOutput").inputs[0], settings.outputs[0])
    if scene is not None:
        drive_scene_inputs(tree, scene)
    return tree


def _drive(socket, scene: bpy.types.Scene, variables: dict, expression: str) -> None:
    """Drive `socket` by scene properties (name -> data path) through a simple expression:
    evaluated without Python, so render farms without the add-on agree."""
    driver = socket.driver_add("default_value").driver
    driver.type = "SCRIPTED"
    for name, path in variables.items():
        var = driver.variables.new()
        var.name, var.type = name, "SINGLE_PROP"
        var.targets[0].id_type = "SCENE"
        var.targets[0].id = scene
        var.targets[0].data_path = path
    driver.expression = expression


def drive_scene_inputs(tree: bpy.types.GeometryNodeTree, scene: bpy.types.Scene) -> None:
    """Drive 'Render Width' by the scene's output width in pixels and 'Motion Blur' by
    whether the scene renders motion blur."""
    inputs = tree.nodes["Settings"].inputs
    inputs["Render Width"].default_value = (scene.render.resolution_x
                                            * scene.render.resolution_percentage / 100)
    _drive(inputs["Render Width"], scene, {"width": "render.resolution_x",
                                           "percent": "render.resolution_percentage"},
           "width * percent / 100")
    inputs["Motion Blur"].default_value = scene.render.use_motion_blur
    _drive(inputs["Motion Blur"], scene, {"blur": "render.use_motion_blur"}, "blur")


# ----------------------------------------------------------------------------- material

def _attribute(b: _Builder, name: str, output: str):
    node = b.node("ShaderNodeAttribute", attribute_name=name, attribute_type="GEOMETRY")
    return node.outputs[output]


def _to_object(b: _Builder, vector, vector_type: str):
    node = b.node("ShaderNodeVectorTransform", vector_type=vector_type, convert_from="WORLD",
                  convert_to="OBJECT")
    b.feed(node.inputs[0], vector)
    return node.outputs[0]


def _ray_alpha(b: _Builder):
    """The Gaussian's maximum along the view ray, in the object's space (see the module)."""
    geometry = b.node("ShaderNodeNewGeometry")
    position = _to_object(b, geometry.outputs["Position"], "POINT")
    incoming = _to_object(b, geometry.outputs["Incoming"], "VECTOR")
    # Proxy meshes carry the corners' offsets (non-zero); points have none: P - mu.
    stored = _attribute(b, ATTR_OFFSET, "Vector")
    from_mean = b.vmath("SUBTRACT", position, _attribute(b, ATTR_MEAN, "Vector"))
    use_mean = b.math("LESS_THAN", b.dot(stored, stored), 1e-30)
    offset = b.vmath("ADD", stored, b.vmath("SCALE", from_mean, use_mean))
    rows = [_attribute(b, name, "Vector") for name in ATTR_WHITEN]
    p = b.combine(*[b.dot(row, offset) for row in rows])
    v = b.combine(*[b.dot(row, incoming) for row in rows])
    along = b.dot(p, v)
    distance2 = b.math("SUBTRACT", b.dot(p, p),
                       b.math("DIVIDE", b.mul(along, along), b.dot(v, v)))
    alpha = b.mul(_attribute(b, ATTR_OPACITY, "Fac"),
                  b.math("EXPONENT", b.mul(distance2, -0.5)))
    alpha = b.math("MINIMUM", alpha, ALPHA_MAX)
    visible = b.mul(b.math("GREATER_THAN", alpha, ALPHA_MIN),
                    b.math("SUBTRACT", 1.0, geometry.outputs["Backfacing"]))
    return b.mul(alpha, visible)


def build_splat_material(dithered: bool = False) -> bpy.types.Material:
    material = bpy.data.materials.new(MATERIAL_DITHERED if dithered else MATERIAL)
    if bpy.app.version < (5, 0, 0):  # always true from 5.0 on
        material.use_nodes = True
    tree = material.node_tree
    tree.nodes.clear()
    b = _Builder(tree)
    emission = b.node("ShaderNodeEmission")
    b.feed(emission.inputs["Color"], _attribute(b, ATTR_COLOR, "Color"))
    emission.inputs["Strength"].default_value = 1.0
    mix = b.node("ShaderNodeMixShader")
    b.feed(mix.inputs[0], _ray_alpha(b))
    b.feed(mix.inputs[1], b.node("ShaderNodeBsdfTransparent").outputs[0])
    b.feed(mix.inputs[2], emission.outputs[0])
    b.feed(b.node("ShaderNodeOutputMaterial").inputs["Surface"], mix.outputs[0])
    _set_transparency(material, dithered)
    return material


def _set_transparency(material: bpy.types.Material, dithered: bool) -> None:
    """EEVEE's transparency: blended in face order with every face drawn (the geometry is
    sorted back to front), or dithered (stochastic), on every Blender version we support."""
    if hasattr(material, "surface_render_method"):  # EEVEE Next (4.2+)
        material.surface_render_method = "DITHERED" if dithered else "BLENDED"
    if hasattr(material, "blend_method"):
        material.blend_method = "HASHED" if dithered else "BLEND"
    if hasattr(material, "use_transparency_overlap"):  # 4.2+: faces of one object overlap
        material.use_transparency_overlap = True
    elif hasattr(material, "show_transparent_back"):
        material.show_transparent_back = True
    if hasattr(material, "use_transparent_shadow"):
        material.use_transparent_shadow = True
    material.use_backface_culling = True  # EEVEE skips back faces; Cycles: see `_ray_alpha`


def splat_material(dithered: bool = False) -> bpy.types.Material:
    material = bpy.data.materials.get(MATERIAL_DITHERED if dithered else MATERIAL)
    return material if material is not None else build_splat_material(dithered)
