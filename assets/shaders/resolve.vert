// Full-screen triangle for the resolve pass (fmgs.runtime.gl_renderer).
#version 430
out vec2 vUV;
void main() {
    vec2 p = vec2((gl_VertexID & 1) * 4.0 - 1.0, (gl_VertexID & 2) * 2.0 - 1.0);
    vUV = 0.5 * p + 0.5;
    gl_Position = vec4(p, 0.0, 1.0);
}
