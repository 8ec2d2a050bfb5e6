#version 330
// Camera-frame points (OpenCV: x right, y down, z forward, cm) projected with the pinhole
// intrinsics of the video, so the mesh lands exactly where the tracker's projection puts it.
uniform vec4 intrinsics;   // fx, fy, cx, cy in pixels
uniform vec2 image_size;   // width, height in pixels
uniform vec2 depth_range;  // near, far in cm

in vec3 in_pos;
in vec3 in_colour;

out vec3 v_pos;
out vec3 v_colour;

void main() {
    float z = in_pos.z;
    float n = depth_range.x;
    float f = depth_range.y;
    // clip.xy / clip.w = pixel / size * 2 - 1; image row 0 maps to NDC y = -1, so the read-back
    // framebuffer comes out top row first like the video frame
    vec2 pixel_times_z = intrinsics.xy * in_pos.xy + intrinsics.zw * z;
    gl_Position = vec4(2.0 * pixel_times_z / image_size - z, (z * (f + n) - 2.0 * f * n) / (f - n), z);
    v_pos = in_pos;
    v_colour = in_colour;
}
