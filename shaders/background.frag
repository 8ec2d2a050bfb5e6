#version 330
uniform sampler2D frame;
uniform float dim;  // darken the video a little so the overlay reads well
in vec2 v_uv;
out vec4 f_colour;

void main() {
    f_colour = vec4(texture(frame, v_uv).rgb * dim, 1.0);
}
