#version 330
// A full-screen quad; texture row 0 (the video's top row) goes to NDC y = -1 (see mesh.vert).
in vec2 in_xy;
out vec2 v_uv;

void main() {
    v_uv = in_xy * 0.5 + 0.5;
    gl_Position = vec4(in_xy, 0.0, 1.0);
}
