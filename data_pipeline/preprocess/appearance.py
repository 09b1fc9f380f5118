"""The input mesh's own colours, as triangle soups ready to rasterise (condition views, schema v2).

Each :class:`ColoredPart` is one indexed draw call: vertices in the sample's normalised space, a
colour per vertex, and an optional texture sampled at per-vertex UVs (face colours are expanded to
three vertices per face). The shaded
colour is ``texture(uv) * corner colour``. Sources, in order:

* glTF/GLB ``PBRMaterial``: ``baseColorTexture`` times ``baseColorFactor`` (the glTF rule);
* OBJ+MTL ``SimpleMaterial``: the diffuse map (``map_Kd``) when present, else the diffuse colour ``Kd``;
* vertex or face colours (``ColorVisuals``);
* anything else: a neutral grey. That includes an OBJ with texture coordinates but no material (no
  ``mtllib``, or a missing .mtl file): trimesh gives it a placeholder 2x2 texture of grey 100/255,
  which is not the mesh's colour and would render it much darker than every other uncoloured mesh.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import trimesh

NEUTRAL_GREY = (0.7, 0.7, 0.7, 1.0)
MAX_TEXTURE_SIDE = 2048   # larger textures are downsampled first: at 518 px a view never needs more


@dataclass
class ColoredPart:
    positions: np.ndarray         # float32 [V, 3] normalised-space vertices
    faces: np.ndarray             # int32 [F, 3] vertex indices
    colors: np.ndarray            # float32 [V, 4] RGBA factor per vertex, in [0, 1]
    uv: np.ndarray | None         # float32 [V, 2] texture coordinates (origin bottom-left) or None
    texture: np.ndarray | None    # uint8 [H, W, 4] RGBA, row 0 = top of the image, or None


def colored_parts(parts: list[trimesh.Trimesh], center: np.ndarray, scale: float) -> list[ColoredPart]:
    """Geometry parts as loaded (scene transforms applied, visuals kept) -> parts in normalised space."""
    out = []
    for part in parts:
        vertices = np.asarray(part.vertices, dtype=np.float64)
        faces = np.asarray(part.faces, dtype=np.int64)
        colors, uv, texture = _appearance(part)
        if part.visual.kind == "face":          # one colour per face: three vertices of its own each
            vertices, faces = vertices[faces.reshape(-1)], np.arange(3 * len(faces)).reshape(-1, 3)
        positions = ((vertices - center) * scale).astype(np.float32)
        out.append(ColoredPart(positions, faces.astype(np.int32), colors, uv, texture))
    return out


def _appearance(part: trimesh.Trimesh):
    """(colours [V, 4] (or [3F, 4] for face colours), uv [V, 2] or None, texture or None) of one part."""
    visual = part.visual
    count = len(part.vertices)
    material = getattr(visual, "material", None)
    if visual.kind == "texture" and material is not None and not _is_placeholder(material):
        image, factor = _material_colour(material)
        uv = getattr(visual, "uv", None)
        if image is not None and uv is not None and len(uv) == count:
            return _fill(factor, count), np.asarray(uv, np.float32), _rgba(image)
        if image is not None:   # a texture without UVs: its mean colour is the best flat stand-in
            factor = factor * _rgba(image).reshape(-1, 4).mean(axis=0) / 255.0
        return _fill(factor, count), None, None
    if visual.kind == "vertex":
        return np.asarray(visual.vertex_colors, np.float32) / 255.0, None, None
    if visual.kind == "face":
        per_face = np.asarray(visual.face_colors, np.float32) / 255.0
        return np.repeat(per_face, 3, axis=0), None, None
    return _fill(np.array(NEUTRAL_GREY), count), None, None


def _is_placeholder(material) -> bool:
    """trimesh's stand-in for a missing material (``empty_material()``: a plain SimpleMaterial whose
    image is 2x2 pixels of one default colour), not a colour the file gave."""
    if type(material) is not trimesh.visual.material.SimpleMaterial or material.image is None:
        return False
    if material.image.size != (2, 2):
        return False
    placeholder = trimesh.visual.material.empty_material().image
    return np.array_equal(np.asarray(material.image.convert("RGBA")), np.asarray(placeholder.convert("RGBA")))


def _material_colour(material) -> tuple[object | None, np.ndarray]:
    """(PIL image or None, RGBA factor in [0, 1]) of a trimesh material."""
    if isinstance(material, trimesh.visual.material.PBRMaterial):
        factor = material.baseColorFactor
        factor = np.ones(4) if factor is None else np.asarray(factor, np.float64) / 255.0
        return material.baseColorTexture, factor
    image = getattr(material, "image", None)
    if image is not None:       # OBJ: map_Kd is shown as painted (exporters' Kd is often a placeholder)
        return image, np.ones(4)
    diffuse = getattr(material, "diffuse", None)
    return None, (np.array(NEUTRAL_GREY) if diffuse is None else np.asarray(diffuse, np.float64) / 255.0)


def _fill(rgba: np.ndarray, count: int) -> np.ndarray:
    colour = np.asarray(rgba, np.float32).copy()
    colour[3] = 1.0              # views are opaque: alpha is coverage only
    return np.broadcast_to(colour, (count, 4)).copy()


def _rgba(image) -> np.ndarray:
    """PIL image -> uint8 [H, W, 4], at most MAX_TEXTURE_SIDE on its longer side."""
    image = image.convert("RGBA")
    if max(image.size) > MAX_TEXTURE_SIDE:
        ratio = MAX_TEXTURE_SIDE / max(image.size)
        image = image.resize((max(1, round(image.size[0] * ratio)), max(1, round(image.size[1] * ratio))))
    return np.asarray(image, dtype=np.uint8)
