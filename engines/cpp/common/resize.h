// Resizing for the C++ programs, written to give what the Python side gives.
//
//   resize_bilinear: 8-bit interleaved pixels, Pillow's `Image.resize(size, Image.BILINEAR)` step for step
//                    (Pillow 13's libImaging/Resample.c): a separable triangle filter whose support grows with
//                    the reduction factor (antialiasing when shrinking), coefficients in 22-bit fixed point,
//                    each pass rounded to 8 bits, the passes in Pillow's order. The model's input then equals
//                    the Python loaders' `np.asarray(image.resize((S, S), Image.BILINEAR))` bit for bit.
//   resize_nearest:  a mask back to the image's size: each output pixel takes the input pixel under its
//                    centre (icmoe.data.volumes.resize_label, Pillow NEAREST), so only existing labels appear.
//   resize_float:    one channel of float logits to the image's size, as Pillow's float ("F") BILINEAR
//                    resize (icmoe.data.images.resize_logits): the same taps in double precision, each pass
//                    accumulated in double and stored as float, the passes in Pillow's order. Upsampling, that
//                    is SAM's post-processing (half-pixel centres, edges clamped); masks are then thresholded or
//                    arg-maxed at full size (common/outputs.h).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

namespace icmoe {

namespace detail {

// Pillow's PRECISION_BITS for 8-bit resampling: 32 - 8 (pixel) - 2 (headroom).
inline constexpr int kResampleBits = 32 - 8 - 2;

// The coefficients of one axis: for output pixel i, `count[i]` weights starting at input `first[i]`.
template <typename W>
struct TapsOf {
  int ksize = 0;
  std::vector<int> first, count;
  std::vector<W> weights;  // out_size * ksize
};
using Taps = TapsOf<int32_t>;         // fixed point (8-bit pixels)
using FloatTaps = TapsOf<double>;     // normalised doubles (float pixels)

inline double triangle(double x) {
  x = std::fabs(x);
  return x < 1.0 ? 1.0 - x : 0.0;
}

// Pillow's precompute_coeffs for the bilinear filter (support 1): normalised double weights.
inline FloatTaps bilinear_float_taps(int in_size, int out_size) {
  FloatTaps t;
  const double scale = static_cast<double>(in_size) / out_size;
  const double filterscale = std::max(scale, 1.0);
  const double support = 1.0 * filterscale;
  const double inv_filterscale = 1.0 / filterscale;  // a product, as Pillow computes it (not a quotient)
  t.ksize = static_cast<int>(std::ceil(support)) * 2 + 1;
  t.first.resize(out_size);
  t.count.resize(out_size);
  t.weights.assign(static_cast<size_t>(out_size) * t.ksize, 0.0);
  for (int i = 0; i < out_size; ++i) {
    const double center = (i + 0.5) * scale;
    const int lo = std::max(static_cast<int>(center - support + 0.5), 0);
    const int n = std::min(static_cast<int>(center + support + 0.5), in_size) - lo;
    double* k = &t.weights[static_cast<size_t>(i) * t.ksize];
    double sum = 0.0;
    for (int x = 0; x < n; ++x) sum += k[x] = triangle((x + lo - center + 0.5) * inv_filterscale);
    for (int x = 0; x < n; ++x)
      if (sum != 0.0) k[x] /= sum;
    t.first[i] = lo;
    t.count[i] = n;
  }
  return t;
}

// The same taps in Pillow's fixed point (normalize_coeffs_8bpc).
inline Taps bilinear_taps(int in_size, int out_size) {
  const FloatTaps f = bilinear_float_taps(in_size, out_size);
  Taps t{f.ksize, f.first, f.count, std::vector<int32_t>(f.weights.size())};
  for (size_t i = 0; i < f.weights.size(); ++i) {
    const double w = f.weights[i] * (1 << kResampleBits);
    t.weights[i] = static_cast<int32_t>(w < 0 ? w - 0.5 : w + 0.5);
  }
  return t;
}

// One pass of float pixels (one channel) along x (`horizontal`) or y: Pillow's ImagingResample*_32bpc.
inline std::vector<float> resample_float_pass(const std::vector<float>& in, int width, int height, int out_size,
                                              bool horizontal) {
  const FloatTaps t = bilinear_float_taps(horizontal ? width : height, out_size);
  const int out_w = horizontal ? out_size : width, out_h = horizontal ? height : out_size;
  std::vector<float> out(static_cast<size_t>(out_w) * out_h);
  for (int y = 0; y < out_h; ++y) {
    for (int x = 0; x < out_w; ++x) {
      const int i = horizontal ? x : y;
      const double* k = &t.weights[static_cast<size_t>(i) * t.ksize];
      double acc = 0.0;
      for (int j = 0; j < t.count[i]; ++j) {
        const int sx = horizontal ? t.first[i] + j : x, sy = horizontal ? y : t.first[i] + j;
        acc += static_cast<double>(in[static_cast<size_t>(sy) * width + sx]) * k[j];
      }
      out[static_cast<size_t>(y) * out_w + x] = static_cast<float>(acc);
    }
  }
  return out;
}

// Pillow 13 runs the vertical pass first when the height shrinks by more than twice as many pixels as the
// width does (each pass rounds, so the order shows in the result; Pillow 12 and older always start with the
// horizontal pass).
inline bool vertical_first(int width, int height, int out_w, int out_h) {
  return height - out_h > 0 && height - out_h > (width - out_w) * 2;
}

inline uint8_t clip8(int32_t v) { return static_cast<uint8_t>(std::clamp(v >> kResampleBits, 0, 255)); }

// One pass along x (`horizontal`) or y over `channels` interleaved 8-bit channels.
inline std::vector<uint8_t> resample_pass(const std::vector<uint8_t>& in, int width, int height, int channels,
                                          int out_size, bool horizontal) {
  const Taps t = bilinear_taps(horizontal ? width : height, out_size);
  const int out_w = horizontal ? out_size : width, out_h = horizontal ? height : out_size;
  std::vector<uint8_t> out(static_cast<size_t>(out_w) * out_h * channels);
  for (int y = 0; y < out_h; ++y) {
    for (int x = 0; x < out_w; ++x) {
      const int i = horizontal ? x : y;
      const int32_t* k = &t.weights[static_cast<size_t>(i) * t.ksize];
      for (int c = 0; c < channels; ++c) {
        int32_t acc = 1 << (kResampleBits - 1);
        for (int j = 0; j < t.count[i]; ++j) {
          const int sx = horizontal ? t.first[i] + j : x, sy = horizontal ? y : t.first[i] + j;
          acc += in[(static_cast<size_t>(sy) * width + sx) * channels + c] * k[j];
        }
        out[(static_cast<size_t>(y) * out_w + x) * channels + c] = clip8(acc);
      }
    }
  }
  return out;
}

// Source index of each output pixel along one axis: the pixel under its centre.
inline std::vector<int> nearest_index(int in_size, int out_size) {
  std::vector<int> index(out_size);
  const double scale = static_cast<double>(in_size) / out_size;
  for (int i = 0; i < out_size; ++i) index[i] = std::min(static_cast<int>((i + 0.5) * scale), in_size - 1);
  return index;
}

}  // namespace detail

// (height, width, channels) 8-bit pixels -> (out_h, out_w, channels), as Pillow's BILINEAR resize.
inline std::vector<uint8_t> resize_bilinear(const std::vector<uint8_t>& pixels, int width, int height, int channels,
                                            int out_w, int out_h) {
  std::vector<uint8_t> out = pixels;
  if (detail::vertical_first(width, height, out_w, out_h)) {  // 8-bit rounding per pass: the order shows
    if (out_h != height) out = detail::resample_pass(out, width, height, channels, out_h, false);
    if (out_w != width) out = detail::resample_pass(out, width, out_h, channels, out_w, true);
    return out;
  }
  if (out_w != width) out = detail::resample_pass(out, width, height, channels, out_w, true);
  if (out_h != height) out = detail::resample_pass(out, out_w, height, channels, out_h, false);
  return out;
}

// (height, width) float values of one channel -> (out_h, out_w), as Pillow's float BILINEAR resize.
inline std::vector<float> resize_float(const float* values, int width, int height, int out_w, int out_h) {
  std::vector<float> out(values, values + static_cast<size_t>(width) * height);
  if (detail::vertical_first(width, height, out_w, out_h)) {
    if (out_h != height) out = detail::resample_float_pass(out, width, height, out_h, false);
    if (out_w != width) out = detail::resample_float_pass(out, width, out_h, out_w, true);
    return out;
  }
  if (out_w != width) out = detail::resample_float_pass(out, width, height, out_w, true);
  if (out_h != height) out = detail::resample_float_pass(out, out_w, height, out_h, false);
  return out;
}

// (height, width) 8-bit mask -> (out_h, out_w), nearest neighbour.
inline std::vector<uint8_t> resize_nearest(const uint8_t* mask, int width, int height, int out_w, int out_h) {
  const std::vector<int> xs = detail::nearest_index(width, out_w), ys = detail::nearest_index(height, out_h);
  std::vector<uint8_t> out(static_cast<size_t>(out_w) * out_h);
  for (int y = 0; y < out_h; ++y)
    for (int x = 0; x < out_w; ++x) out[static_cast<size_t>(y) * out_w + x] = mask[static_cast<size_t>(ys[y]) * width + xs[x]];
  return out;
}

}  // namespace icmoe
