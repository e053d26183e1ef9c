// Limits on what decoding one image may cost, checked from its header before any pixel is decoded, and
// the decoded samples every decoder returns.
//
//   DecodeLimits:  the most pixels (width x height) an image may have and the most bytes decoding it may
//                  allocate. Defaults as the Python readers' (icmoe.data.images: Pillow's 89,478,485 pixels,
//                  2 GiB), overridden by the same environment variables ICMOE_MAX_IMAGE_PIXELS and
//                  ICMOE_MAX_DECODED_BYTES (whole numbers > 0; anything else is a usage error).
//   check_limits:  one-line error naming the file when a header asks for more.
//   Samples:       decoded interleaved samples, 8 or 16 bits, with their channel count.
#pragma once

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <stdexcept>
#include <string>
#include <vector>

namespace icmoe {

inline constexpr uint64_t kDefaultMaxImagePixels = 89478485;  // Pillow's Image.MAX_IMAGE_PIXELS
inline constexpr uint64_t kDefaultMaxDecodedBytes = uint64_t{2} << 30;
inline constexpr const char* kMaxPixelsEnv = "ICMOE_MAX_IMAGE_PIXELS";
inline constexpr const char* kMaxBytesEnv = "ICMOE_MAX_DECODED_BYTES";

struct DecodeLimits {
  uint64_t max_pixels = kDefaultMaxImagePixels;
  uint64_t max_bytes = kDefaultMaxDecodedBytes;
};

namespace detail {

// A whole number > 0 from the environment variable `name`, or `fallback` when it is unset.
inline uint64_t env_count(const char* name, uint64_t fallback) {
  const char* text = std::getenv(name);
  if (text == nullptr) return fallback;
  const std::string s(text);
  bool digits = !s.empty() && s.size() <= 18;
  for (char c : s) digits = digits && c >= '0' && c <= '9';
  const uint64_t value = digits ? std::stoull(s) : 0;
  if (value == 0) throw std::invalid_argument(std::string(name) + " must be a whole number > 0, got '" + s + "'");
  return value;
}

inline std::string mib(uint64_t bytes) { return std::to_string((bytes + (1u << 20) - 1) >> 20) + " MiB"; }

}  // namespace detail

// The limits in force: the defaults, or the environment's (std::invalid_argument for a bad value).
inline DecodeLimits decode_limits() {
  return {detail::env_count(kMaxPixelsEnv, kDefaultMaxImagePixels),
          detail::env_count(kMaxBytesEnv, kDefaultMaxDecodedBytes)};
}

// Why an image of width x height pixels may not be decoded ("" when it may): it has none, it is above the
// pixel limit, or decoding it needs more than the byte limit (`bytes_per_pixel`: every buffer decoding makes).
inline std::string limit_problem(uint64_t width, uint64_t height, uint64_t bytes_per_pixel, const DecodeLimits& limits) {
  const std::string size = std::to_string(width) + "x" + std::to_string(height);
  if (width == 0 || height == 0) return "image has no pixels (" + size + ")";
  const uint64_t pixels = width * height;  // both < 2^32: no overflow
  if (pixels > limits.max_pixels)
    return "image of " + size + " pixels is above the limit of " + std::to_string(limits.max_pixels) + " pixels (" +
           kMaxPixelsEnv + ")";
  if (pixels > limits.max_bytes / bytes_per_pixel)
    return "decoding the " + size + " image needs " + detail::mib(pixels * bytes_per_pixel) + ", above the limit of " +
           detail::mib(limits.max_bytes) + " (" + kMaxBytesEnv + ")";
  return "";
}

// limit_problem for a decoder's callbacks, which must not throw: true when within the limits, else false with
// the reason in `message` (at most `size` bytes).
inline bool within_limits(uint64_t width, uint64_t height, uint64_t bytes_per_pixel, const DecodeLimits& limits,
                          char* message, size_t size) noexcept {
  try {
    const std::string why = limit_problem(width, height, bytes_per_pixel, limits);
    std::snprintf(message, size, "%s", why.c_str());
    return why.empty();
  } catch (...) {
    std::snprintf(message, size, "out of memory");
    return false;
  }
}

// limit_problem as a one-line error naming `path`.
inline void check_limits(const std::string& path, uint64_t width, uint64_t height, uint64_t bytes_per_pixel,
                         const DecodeLimits& limits) {
  const std::string why = limit_problem(width, height, bytes_per_pixel, limits);
  if (!why.empty()) throw std::runtime_error(path + ": " + why);
}

// Decoded pixels: `channels` interleaved samples per pixel, row-major, in `bytes` (8 bits) or `words`
// (16 bits, native byte order). `gray16_by_range`: 16-bit gray that Pillow reads as mode "I;16" (mapped by
// its own range), as opposed to 16-bit colour or gray+alpha (their high bytes).
struct Samples {
  int width = 0;
  int height = 0;
  int channels = 0;
  bool wide = false;
  bool gray16_by_range = false;
  bool palette = false;  // `bytes` holds palette indices (png_io.h looks them up before returning)
  std::vector<uint8_t> bytes;
  std::vector<uint16_t> words;
};

// Bytes per pixel that turning samples into the upright 8-bit RGB picture adds to the decoder's own buffer:
// the RGB copy and the copy EXIF orientation makes.
inline constexpr uint64_t kRgbBytesPerPixel = 6;

}  // namespace icmoe
