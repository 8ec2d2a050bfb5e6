#version 330
// Faceted Lambert + a little specular from a head-light; the face normal comes from screen-space
// derivatives of the position, so the CPU never computes normals per frame.
uniform float opacity;
uniform int flat_colour;  // 1: wireframe lines, colour only

in vec3 v_pos;
in vec3 v_colour;
out vec4 f_colour;

void main() {
    if (flat_colour == 1) {
        f_colour = vec4(v_colour, opacity);
        return;
    }
    vec3 n = normalize(cross(dFdx(v_pos), dFdy(v_pos)));
    vec3 to_eye = normalize(-v_pos);
    if (dot(n, to_eye) < 0.0) n = -n;
    float diffuse = max(dot(n, to_eye), 0.0);
    float specular = pow(diffuse, 24.0) * 0.25;
    vec3 colour = v_colour * (0.25 + 0.75 * diffuse) + specular;
    f_colour = vec4(colour, opacity);
}
