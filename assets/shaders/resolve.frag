// Resolve pass: turns the accumulated surfel targets into a displayable 8-bit image.
// uMode: 0 RGB, 1 normal ((n + 1) / 2 of the unit camera-space normal, OpenCV axes),
// 2 depth (expected depth, turbo colour map over [uDepthRange.x, uDepthRange.y], near = red),
// 3 semantic (per-pixel argmax of the composited logits -> palette; alpha-blended on the
// background like the other modes). Texture rows are GL rows (bottom up), as the surfel pass
// wrote them, so the image appears upright on screen. gl_renderer compiles one program per mode
// (#define MODE 0..3): only the mode's textures are read (a full-screen pass costs ~10 ms on
// llvmpipe at 512^2 otherwise).
#version 430
in vec2 vUV;
out vec4 fragColor;
#ifndef MODE
#define MODE 0
#endif
uniform vec3 uBackground;
uniform vec2 uDepthRange;
uniform int uNumLogits;
uniform vec3 uPalette[32];
uniform sampler2D tColor;
uniform sampler2D tNormal;
uniform sampler2D tDepth;
uniform sampler2D tLogits[10];

vec3 turbo(float t) {
    // polynomial fit of Google's Turbo colour map (Mikhailov 2019)
    t = clamp(t, 0.0, 1.0);
    const vec4 kr = vec4(0.13572138, 4.61539260, -42.66032258, 132.13108234);
    const vec4 kg = vec4(0.09140261, 2.19418839, 4.84296658, -14.18503333);
    const vec4 kb = vec4(0.10667330, 12.64194608, -60.58204836, 110.36276771);
    const vec2 kr2 = vec2(-152.94239396, 59.28637943);
    const vec2 kg2 = vec2(4.27729857, 2.82956604);
    const vec2 kb2 = vec2(-89.90310912, 27.34824973);
    vec4 v4 = vec4(1.0, t, t * t, t * t * t);
    vec2 v2 = v4.zw * v4.z;
    return vec3(dot(v4, kr) + dot(v2, kr2), dot(v4, kg) + dot(v2, kg2), dot(v4, kb) + dot(v2, kb2));
}

void main() {
    ivec2 ij = ivec2(gl_FragCoord.xy);
#if MODE != 3
    vec4 c = texelFetch(tColor, ij, 0);
    float a = c.a;
    vec3 rgb = c.rgb + uBackground * (1.0 - a);
#else
    float a;
    vec3 rgb;
#endif
#if MODE == 1
    {
        vec3 n = texelFetch(tNormal, ij, 0).rgb;
        float l = length(n);
        vec3 v = l > 0.0 ? 0.5 * (n / l) + 0.5 : vec3(0.5);
        rgb = v * a + uBackground * (1.0 - a);
    }
#elif MODE == 2
    {
        float z = texelFetch(tDepth, ij, 0).r / max(a, 1e-6);
        float t = (z - uDepthRange.x) / max(uDepthRange.y - uDepthRange.x, 1e-6);
        rgb = turbo(1.0 - t) * a + uBackground * (1.0 - a);
    }
#elif MODE == 3
    {
        a = texelFetch(tLogits[0], ij, 0).a;
        float best = 0.0;
        int arg = 0;
        for (int k = 0; k < 10; ++k) {
            vec3 l = texelFetch(tLogits[k], ij, 0).rgb;
            for (int j = 0; j < 3; ++j) {
                int cls = 3 * k + j;
                if (cls < uNumLogits && (cls == 0 || l[j] > best)) { best = l[j]; arg = cls; }
            }
        }
        rgb = uPalette[arg] * a + uBackground * (1.0 - a);
    }
#endif
    fragColor = vec4(clamp(rgb, 0.0, 1.0), 1.0);
}
