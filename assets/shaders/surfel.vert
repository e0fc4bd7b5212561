// 2D Gaussian surfel (2DGS) primitives, fmgs-avatar runtime (fmgs.runtime.gl_renderer).
// Per surfel this shader computes the quantities of fmgs.trainer.raster_cpu.surfel_camera_terms
// (ray-splat matrix M, b, projected centre, centre depth, camera-facing normal) and a primitive
// that covers the whole alpha >= uAlphaMin support {min(rho3d, rho2d) <= r2}, r2 = 2 ln(o / uAlphaMin)
// (the ellipse u^2 + v^2 <= r2 in the surfel plane united with the low-pass filter disc
// |pix - proj(p)| <= sqrt(r2 / 2) px); the fragment shader evaluates the exact 2DGS alpha.
//
// Primitive variants (#define, injected by gl_renderer):
//   POINTS: one GL point per surfel (1 vertex: cheapest on llvmpipe), a square of side
//           gl_PointSize around the centre of the support's pixel box (the dual conic of the
//           cut-off ellipse, as raster_cpu._surfel_boxes, united with the filter disc), the
//           box clipped to the viewport so that the point centre stays inside it. The caller
//           guarantees the side fits uMaxPoint (SurfelRenderer.points_fit), else uses quads.
//   default: an instanced 4-vertex triangle strip: the projection of the surfel-plane square
//           p +- r s_u t_u +- r s_v t_v (r = sqrt(r2)), which circumscribes the projected cut-off
//           ellipse (projective maps keep tangency), with every edge pushed out by the filter
//           radius (Minkowski sum with the disc, mitred corners); the pixel box above where
//           that is larger or not possible (square crossing the camera plane, corner < ~22 deg).
// Outputs per render pass (same defines as the fragment shader): RGB needs only M, the centre,
// opacity and colour; OUT_GEOMETRY adds b, the centre depth and the normal; OUT_LOGITS the index.
//
// Conventions: OpenCV camera (x right, y down, z forward); pixel (i, j) centre at
// (j + 0.5, i + 0.5); image row 0 at the top. Surfel data are planar float arrays in an SSBO:
// row k of the (16, S) table holds attribute k of every surfel (see gl_renderer.ROWS).
#version 430

layout(std430, binding = 0) readonly buffer SurfelTable { float tab[]; };

uniform int uS;            // number of surfels (row stride of the table)
uniform mat3 uR;           // world -> camera rotation
uniform vec3 uT;           // world -> camera translation (metres)
uniform mat3 uK;           // pixel intrinsics
uniform mat3 uKinvT;       // transpose(inverse(K))
uniform vec2 uSize;        // (width, height) in pixels
uniform float uNear;       // near culling distance (metres)
uniform float uCullCos;    // cull surfels whose outward normal (t_u x t_v) faces away: cos > uCullCos (>1: off)
uniform float uAlphaMin;   // alpha cut-off (1/255: the trainer's)
uniform float uMaxPoint;   // largest point size the implementation rasterises (POINTS)

in uint in_idx;            // surfel index (primitives are drawn back to front)

// Flat varyings, packed into as few vec4 as possible: llvmpipe's per-primitive setup cost grows
// with the number of fragment-shader inputs.
flat out vec4 vA;          // (row 0 of the ray-splat matrix M: q = M (x, y, 1), projected centre x px)
flat out vec4 vB;          // (row 1 of M, projected centre y px)
flat out vec4 vC;          // (row 2 of M, cut-off r2 slightly inflated: conservative early reject)
flat out vec4 vCol;        // colour rgb, opacity
#ifdef OUT_GEOMETRY
flat out vec4 vN;          // camera-space unit normal facing the camera, b = n . p (depth = b / q_w)
flat out float vZc;        // centre depth
#endif
#ifdef OUT_LOGITS
flat out uint vIdx;
#endif

float row(int k, uint i) { return tab[k * uS + int(i)]; }

vec2 project(vec3 q) { vec3 h = uK * q; return h.xy / h.z; }

// outward unit normal of the edge a -> b of a convex polygon whose signed (shoelace) area has
// the sign sgn
vec2 edgeNormal(vec2 a, vec2 b, float sgn) {
    vec2 e = b - a;
    return sgn * normalize(vec2(e.y, -e.x));
}

void main() {
    uint i = in_idx;
    vec3 pw = vec3(row(0, i), row(1, i), row(2, i));
    vec3 tuw = vec3(row(3, i), row(4, i), row(5, i));
    vec3 tvw = vec3(row(6, i), row(7, i), row(8, i));
    float su = row(9, i);
    float sv = row(10, i);
    float o = row(11, i);

    vec3 p = uR * pw + uT;
    vec3 tu = uR * tuw;
    vec3 tv = uR * tvw;
    vec3 n = cross(tu, tv);
    float np = dot(n, p);
    bool away = np > uCullCos * length(n) * length(p);   // back-facing (optional speed-up)
    if (np > 0.0) n = -n;                                // face the camera
    vec3 m = -n;
    float b = dot(m, p);
    vec3 ph = uK * p;
    vec2 mean2d = ph.xy / ph.z;
    vA = vec4(uKinvT * ((b * tu - dot(tu, p) * m) / su), mean2d.x);
    vB = vec4(uKinvT * ((b * tv - dot(tv, p) * m) / sv), mean2d.y);
    vCol = vec4(row(12, i), row(13, i), row(14, i), o);
#ifdef OUT_GEOMETRY
    vN = vec4(n, b);
    vZc = p.z;
#endif
#ifdef OUT_LOGITS
    vIdx = i;
#endif

    // support {alpha >= uAlphaMin}: rho <= r2 (slightly inflated: the fragment test is exact)
    float r2 = max(2.0 * log(max(o, 1e-30) / uAlphaMin), 0.0) * (1.0 + 1e-6) + 1e-9;
    vC = vec4(uKinvT * m, r2 * (1.0 + 1e-4) + 1e-4);
    bool culled = (p.z < uNear) || (o < uAlphaMin) || (r2 <= 1e-9) || away;
    float rf = sqrt(r2 * 0.5);                   // filter disc radius, pixels
    vec3 h0 = uK * (su * tu);
    vec3 h1 = uK * (sv * tv);
    vec3 h2 = ph;
#ifndef POINTS
    // tight quad: projected corners of the surfel-plane square, offset by the filter radius
    float r = sqrt(r2);
    vec3 A = r * h0, B = r * h1;
    vec3 q0 = h2 + A + B, q1 = h2 + A - B, q2 = h2 - A - B, q3 = h2 - A + B;   // cyclic order
    float zmin = min(min(q0.z, q1.z), min(q2.z, q3.z));
    bool tight = zmin > 1e-3 * h2.z;
    vec2 c0 = q0.xy / q0.z, c1 = q1.xy / q1.z, c2 = q2.xy / q2.z, c3 = q3.xy / q3.z;
    // orientation of the quadrilateral (shoelace), the outward normals and the mitred corners
    float area2 = (c0.x * c1.y - c1.x * c0.y) + (c1.x * c2.y - c2.x * c1.y)
                + (c2.x * c3.y - c3.x * c2.y) + (c3.x * c0.y - c0.x * c3.y);
    float sgn = area2 >= 0.0 ? 1.0 : -1.0;
    vec2 e01 = edgeNormal(c0, c1, sgn), e12 = edgeNormal(c1, c2, sgn);
    vec2 e23 = edgeNormal(c2, c3, sgn), e30 = edgeNormal(c3, c0, sgn);
    float k0 = 1.0 + dot(e30, e01), k1 = 1.0 + dot(e01, e12);
    float k2 = 1.0 + dot(e12, e23), k3 = 1.0 + dot(e23, e30);
    tight = tight && abs(area2) > 1e-6 && min(min(k0, k1), min(k2, k3)) > 0.07;   // mitre <= ~5.3x
    float mgq = 0.0625 + 1e-5 * (abs(mean2d.x) + abs(mean2d.y) + rf
                                 + max(max(length(c0 - mean2d), length(c1 - mean2d)),
                                       max(length(c2 - mean2d), length(c3 - mean2d))));
    float dq = rf + mgq;
    vec2 o0 = c0 + dq * (e30 + e01) / k0, o1 = c1 + dq * (e01 + e12) / k1;
    vec2 o2 = c2 + dq * (e12 + e23) / k2, o3 = c3 + dq * (e23 + e30) / k3;
    float tightArea = 0.5 * abs((o0.x - o2.x) * (o1.y - o3.y) - (o1.x - o3.x) * (o0.y - o2.y));
    int c = gl_VertexID;                         // triangle strip 0, 1, 3, 2 of the cyclic corners
    vec2 xy = c == 0 ? o0 : c == 1 ? o1 : c == 2 ? o3 : o2;
#endif
    // pixel box of the support: dual conic of the cut-off ellipse (raster_cpu._surfel_boxes)
    // united with the filter disc, clipped to the viewport (the whole screen if unbounded)
    float d22 = r2 * (h0.z * h0.z + h1.z * h1.z) - h2.z * h2.z;
    bool ok = d22 < -1e-12 * h2.z * h2.z;
    vec2 lo = vec2(-1.0);
    vec2 hi = uSize + 1.0;
    if (ok) {
        float cx = (r2 * (h0.x * h0.z + h1.x * h1.z) - h2.x * h2.z) / d22;
        float cy = (r2 * (h0.y * h0.z + h1.y * h1.z) - h2.y * h2.z) / d22;
        float ex = sqrt(max(cx * cx - (r2 * (h0.x * h0.x + h1.x * h1.x) - h2.x * h2.x) / d22, 0.0));
        float ey = sqrt(max(cy * cy - (r2 * (h0.y * h0.y + h1.y * h1.y) - h2.y * h2.y) / d22, 0.0));
        // float32 margin: the fragment shader applies the exact cut-off test
        float mg = 0.0625 + 1e-5 * (abs(cx) + abs(cy) + ex + ey);
        lo = max(min(vec2(cx - ex, cy - ey), mean2d - rf) - mg, vec2(-1.0));
        hi = min(max(vec2(cx + ex, cy + ey), mean2d + rf) + mg, uSize + 1.0);
    }
    culled = culled || any(greaterThan(lo, hi));
#ifndef POINTS
    // the smaller of the two (pixel boxes win for tiny and for thin, mitred surfels)
    tight = tight && tightArea < (hi.x - lo.x) * (hi.y - lo.y);
#endif
#ifdef POINTS
    // pixel centres lie in [0.5, size - 0.5]: clip the box to [0.25, size - 0.25] so the point
    // centre is inside the clip volume (points are clipped by their centre)
    lo = max(lo, vec2(0.25));
    hi = min(hi, uSize - 0.25);
    culled = culled || any(greaterThan(lo, hi));
    vec2 cen = 0.5 * (lo + hi);
    gl_PointSize = min(max(hi.x - lo.x, hi.y - lo.y) + 0.02, uMaxPoint);
    vec2 ndc = vec2(2.0 * cen.x / uSize.x - 1.0, 1.0 - 2.0 * cen.y / uSize.y);
    gl_Position = culled ? vec4(2.0, 2.0, 2.0, 1.0) : vec4(ndc, 0.0, 1.0);
#else
    if (!tight)
        xy = vec2((c & 1) == 1 ? hi.x : lo.x, (c & 2) == 2 ? hi.y : lo.y);
    vec2 ndc = vec2(2.0 * xy.x / uSize.x - 1.0, 1.0 - 2.0 * xy.y / uSize.y);
    gl_Position = culled ? vec4(2.0, 2.0, 2.0, 1.0) : vec4(ndc, 0.0, 1.0);
#endif
}
