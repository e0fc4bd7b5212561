// 2DGS fragment: exact ray / surfel-plane intersection (u, v) with the screen-space low-pass
// filter, alpha = min(0.99, o exp(-min(rho3d, rho2d) / 2)), fragments below uAlphaMin (1/255:
// the trainer's) discarded (Huang et al. 2024, eq. 9-12; the conventions of
// fmgs.trainer.raster_cpu). Outputs are premultiplied by alpha and blended back to front with
// (ONE, ONE_MINUS_SRC_ALPHA), so every target's .a holds the accumulated opacity.
// A conservative cut-off test without division or exp comes first, so llvmpipe skips the rest
// (division, exp, blending) for groups of pixels entirely outside the support.
// Variants (#define, injected by gl_renderer; the vertex shader gets the same ones):
//   OUT_GEOMETRY: location 1 = (normal * a, a), location 2 = (depth * a, 0, 0, a)
//   OUT_LOGITS N: locations 0..N-1 = 3 semantic logits each (from uLogitBase), no colour
#version 430

uniform float uH;          // image height (pixels): image y = H - gl_FragCoord.y
uniform float uAlphaMin;   // alpha cut-off

flat in vec4 vA;           // (row 0 of M, projected centre x)  -- see surfel.vert
flat in vec4 vB;           // (row 1 of M, projected centre y)
flat in vec4 vC;           // (row 2 of M, r2 slightly inflated)
flat in vec4 vCol;         // colour, opacity
#ifdef OUT_GEOMETRY
flat in vec4 vN;           // normal, b
flat in float vZc;         // centre depth
#endif

#ifdef OUT_LOGITS
flat in uint vIdx;
layout(std430, binding = 1) readonly buffer LogitTable { float logits[]; };
uniform int uS;
uniform int uNumLogits;
uniform int uLogitBase;    // first logit of this pass
layout(location = 0) out vec4 outL[OUT_LOGITS];
#else
layout(location = 0) out vec4 outColor;
#ifdef OUT_GEOMETRY
layout(location = 1) out vec4 outNormal;
layout(location = 2) out vec4 outDepth;
#endif
#endif

void main() {
    vec2 pix = vec2(gl_FragCoord.x, uH - gl_FragCoord.y);
    vec2 d = pix - vec2(vA.w, vB.w);
    float rho2 = 2.0 * dot(d, d);
    vec3 x = vec3(pix, 1.0);
    float qw = dot(vC.xyz, x);
    float qu = dot(vA.xyz, x);
    float qv = dot(vB.xyz, x);
    float num = qu * qu + qv * qv;
    bool front = qw > 1e-7;
    // outside the support of both terms (rho3 = num / qw^2 > r2 and rho2 > r2; r2 slightly
    // inflated, so conservative): discarded before the division and the exp, so llvmpipe skips
    // the rest for 8-pixel groups that are entirely outside
    if (!(front && num <= vC.w * qw * qw) && rho2 > vC.w) discard;
    float inv = 1.0;
    float rho3 = 3.0e38;
    if (front) {
        inv = 1.0 / qw;
        rho3 = num * inv * inv;
    }
    bool use3 = rho3 <= rho2;
    float rho = use3 ? rho3 : rho2;
    float a = vCol.a * exp(-0.5 * rho);
    if (a < uAlphaMin) discard;                  // the exact cut-off
    a = min(a, 0.99);
#ifdef OUT_LOGITS
    for (int k = 0; k < OUT_LOGITS; ++k) {
        vec3 l = vec3(0.0);
        for (int c = 0; c < 3; ++c) {
            int j = uLogitBase + 3 * k + c;
            if (j < uNumLogits) l[c] = logits[j * uS + int(vIdx)];
        }
        outL[k] = vec4(l * a, a);
    }
#else
    outColor = vec4(vCol.rgb * a, a);
#ifdef OUT_GEOMETRY
    float z = use3 ? vN.w * inv : vZc;
    outNormal = vec4(vN.xyz * a, a);
    outDepth = vec4(z * a, 0.0, 0.0, a);
#endif
#endif
}
