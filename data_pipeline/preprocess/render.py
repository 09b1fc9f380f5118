"""Condition views: rasterise a coloured mesh from the cameras of data_pipeline/cameras.py.

OpenGL 3.3 through moderngl on a headless EGL context; on a machine without a GPU that is Mesa's
llvmpipe software rasteriser (Debian: libegl1 + libgl1-mesa-dri), measured against Embree ray casting
in docs/benchmarks.md. One context per process, made on first use. Output per view: RGBA uint8
[S, S, 4], straight (not premultiplied) colour, alpha = pixel coverage from 4x multisampling.

Pixel convention: the projection below maps camera point (x, y, z) to NDC so that pixel column u
and row v of the returned array are exactly those of ``cameras.project`` (u = fx x/z + cx, row 0 at
the top); GL's bottom-up rows are absorbed by mapping v = 0 to NDC y = -1 and reading rows as stored.

Lighting is fixed in camera space, so every view of every mesh is lit alike: ambient 0.35 plus a
Lambertian key light 0.65 from above-left-front; normals are per triangle (screen-space derivatives)
and turned towards the camera, so open and inconsistently wound meshes shade the same on both sides.
"""
from __future__ import annotations

import io

import numpy as np

from data_pipeline.preprocess.appearance import ColoredPart

MSAA_SAMPLES = 4
PNG_LEVEL = 3          # zlib level of the lossless PNGs (speed vs size, see docs/benchmarks.md)
AMBIENT, KEY = 0.35, 0.65
KEY_DIRECTION = (-0.3, -0.5, -1.0)     # camera space (x right, y down, z forward): up-left, towards the camera

VERTEX_SHADER = """
#version 330
uniform mat4 world_to_clip;
uniform mat4 world_to_camera;
in vec3 in_position;
in vec4 in_color;
in vec2 in_uv;
out vec3 camera_position;
out vec4 color;
out vec2 uv;
void main() {
    camera_position = (world_to_camera * vec4(in_position, 1.0)).xyz;
    color = in_color;
    uv = in_uv;
    gl_Position = world_to_clip * vec4(in_position, 1.0);
}
"""
FRAGMENT_SHADER = """
#version 330
uniform sampler2D base_color;
uniform vec3 key_direction;
uniform float ambient;
uniform float key;
in vec3 camera_position;
in vec4 color;
in vec2 uv;
out vec4 fragment;
void main() {
    vec3 normal = normalize(cross(dFdx(camera_position), dFdy(camera_position)));
    if (dot(normal, camera_position) > 0.0) normal = -normal;     // face the camera (two-sided)
    float shade = ambient + key * max(dot(normal, normalize(key_direction)), 0.0);
    vec3 rgb = texture(base_color, uv).rgb * color.rgb * shade;
    fragment = vec4(min(rgb, vec3(1.0)), 1.0);
}
"""


class RenderError(RuntimeError):
    """No OpenGL context could be made (missing system libraries); the message says what to install."""


_CONTEXT = None


def _context():
    """This process's headless GL context (llvmpipe takes its thread count from LP_NUM_THREADS)."""
    global _CONTEXT
    if _CONTEXT is None:
        try:
            import moderngl
            _CONTEXT = moderngl.create_standalone_context(backend="egl", require=330)
        except Exception as err:  # noqa: BLE001  (ImportError, or moderngl's bare Exception for a missing libEGL)
            raise RenderError(
                f"condition views need a headless OpenGL 3.3 context through EGL ({type(err).__name__}: {err}); "
                "install the Python package moderngl and Debian's libegl1 + libgl1-mesa-dri "
                "(Mesa llvmpipe), or preprocess with views=0") from None
    return _CONTEXT


def context_made() -> bool:
    """Whether this process holds an OpenGL context (worker_pool must not fork it then)."""
    return _CONTEXT is not None


def camera_to_clip(intrinsics: np.ndarray, size: int, near: float, far: float) -> np.ndarray:
    """4x4 matrix: OpenCV camera coordinates -> GL clip space, so that NDC x = 2u/S - 1, y = 2v/S - 1
    with (u, v) the pixel position of cameras.project (rows counted from the top)."""
    fx, fy, cx, cy = intrinsics[0, 0], intrinsics[1, 1], intrinsics[0, 2], intrinsics[1, 2]
    return np.array([
        [2 * fx / size, 0.0, 2 * cx / size - 1, 0.0],
        [0.0, 2 * fy / size, 2 * cy / size - 1, 0.0],
        [0.0, 0.0, (far + near) / (far - near), -2 * far * near / (far - near)],
        [0.0, 0.0, 1.0, 0.0],
    ])


class _Targets:
    """The shader program and the framebuffers of one image size, kept for the process's lifetime
    (compiling and allocating them per mesh cost about a tenth of a second)."""

    def __init__(self, ctx, size: int) -> None:
        self.program = ctx.program(vertex_shader=VERTEX_SHADER, fragment_shader=FRAGMENT_SHADER)
        self.program["key_direction"].value = KEY_DIRECTION
        self.program["ambient"].value = AMBIENT
        self.program["key"].value = KEY
        self.white = ctx.texture((1, 1), 4, bytes([255, 255, 255, 255]))
        self.msaa = ctx.framebuffer(
            color_attachments=[ctx.renderbuffer((size, size), 4, samples=MSAA_SAMPLES)],
            depth_attachment=ctx.depth_renderbuffer((size, size), samples=MSAA_SAMPLES))
        self.resolved = ctx.simple_framebuffer((size, size), components=4)


_TARGETS: dict[int, _Targets] = {}


class ViewRenderer:
    """Uploads a mesh once, then renders it from any number of cameras."""

    def __init__(self, parts: list[ColoredPart], size: int) -> None:
        self.ctx = _context()
        self.size = size
        if size not in _TARGETS:
            _TARGETS[size] = _Targets(self.ctx, size)
        targets = _TARGETS[size]
        self.program, self.white = targets.program, targets.white
        self.msaa, self.resolved = targets.msaa, targets.resolved
        self.draws = [self._upload(part) for part in parts if len(part.positions)]

    def _upload(self, part: ColoredPart):
        uv = part.uv if part.uv is not None else np.zeros((len(part.positions), 2), np.float32)
        interleaved = np.hstack([part.positions, part.colors, uv]).astype(np.float32)   # [V, 9]
        buffer = self.ctx.buffer(interleaved.tobytes())
        index = self.ctx.buffer(np.ascontiguousarray(part.faces, dtype=np.int32).tobytes())
        vao = self.ctx.vertex_array(self.program, [(buffer, "3f 4f 2f", "in_position", "in_color", "in_uv")],
                                    index_buffer=index, index_element_size=4)
        texture = self.white
        if part.texture is not None and part.uv is not None:
            image = np.ascontiguousarray(part.texture[::-1])    # GL row 0 is t = 0, the image's bottom
            texture = self.ctx.texture((image.shape[1], image.shape[0]), 4, image.tobytes())
            texture.build_mipmaps()
            texture.repeat_x = texture.repeat_y = True
        return vao, texture, (buffer, index)

    def render(self, intrinsics, world_to_camera) -> np.ndarray:
        """uint8 [S, S, 4] RGBA of one camera (straight alpha, alpha = coverage)."""
        import moderngl
        k, w2c = np.asarray(intrinsics, np.float64), np.asarray(world_to_camera, np.float64)
        distance = float(np.linalg.norm(w2c[:3, 3]))      # camera to the origin; the object lies within sqrt 3
        clip = camera_to_clip(k, self.size, max(distance - 2.0, 1e-3), distance + 2.0) @ w2c
        self.program["world_to_clip"].write(clip.T.astype("f4").tobytes())      # GL wants column-major
        self.program["world_to_camera"].write(w2c.T.astype("f4").tobytes())
        self.msaa.use()
        self.ctx.enable(moderngl.DEPTH_TEST)
        self.ctx.disable(moderngl.CULL_FACE)
        self.msaa.clear(0.0, 0.0, 0.0, 0.0, depth=1.0)
        for vao, texture, _ in self.draws:
            texture.use(0)
            vao.render(moderngl.TRIANGLES)
        self.ctx.copy_framebuffer(self.resolved, self.msaa)     # resolve: colour * coverage, alpha = coverage
        pixels = np.frombuffer(self.resolved.read(components=4), np.uint8).reshape(self.size, self.size, 4)
        return unpremultiply(pixels)

    def release(self) -> None:
        for vao, texture, buffers in self.draws:
            vao.release()
            for buffer in buffers:
                buffer.release()
            if texture is not self.white:
                texture.release()
        self.draws = []


def unpremultiply(pixels: np.ndarray) -> np.ndarray:
    """Resolved MSAA colour is premultiplied by coverage (clear colour 0): divide it back out.
    Only edge pixels (0 < alpha < 255) change, so only they are touched."""
    out = pixels.copy()
    edge = (pixels[..., 3] > 0) & (pixels[..., 3] < 255)
    alpha = pixels[edge][:, 3:].astype(np.float32)                    # [E, 1]
    rgb = pixels[edge][:, :3].astype(np.float32) * 255.0 / alpha      # [E, 3]
    out[edge, :3] = np.clip(np.rint(rgb), 0, 255).astype(np.uint8)
    return out


def render_views(parts: list[ColoredPart], cameras: list[dict], size: int) -> list[np.ndarray]:
    """RGBA uint8 [S, S, 4] per camera (json entries of cameras.sample_cameras)."""
    renderer = ViewRenderer(parts, size)
    try:
        return [renderer.render(c["intrinsics"], c["world_to_camera"]) for c in cameras]
    finally:
        renderer.release()


def encode_png(rgba: np.ndarray) -> bytes:
    from PIL import Image
    buffer = io.BytesIO()
    Image.fromarray(rgba, mode="RGBA").save(buffer, format="PNG", compress_level=PNG_LEVEL)
    return buffer.getvalue()
