// Image I/O for the IC-MoE C++ programs: decoding untrusted files safely, and writing masks atomically.
//
//   load_image:   PNG (libpng, png_io.h), JPEG (libjpeg-turbo, jpeg_io.h), BMP and binary PPM/PGM (bmp_pnm.h) of
//                 any size within DecodeLimits (decode_limits.h) -> 8-bit RGB, the pixels the Python side
//                 (icmoe.data.images.read_image) gets from Pillow: EXIF orientation applied (JPEG APP1, PNG
//                 eXIf; ImageOps.exif_transpose), gray replicated to RGB, alpha dropped (not composited),
//                 palettes expanded; a 16-bit gray PNG (and a PGM of more than 8 bits) mapped to 0..255 by its
//                 own min..max (range_to_uint8), 16-bit colour PNGs by their high bytes (as Pillow reads
//                 them), PPM/PGM of another maxval rescaled as Pillow does. JPEG goes through the library
//                 Pillow uses, with its settings, so its pixels equal Pillow's too. The format is found from
//                 the file's first bytes, never from its name.
//   model_input:  8-bit RGB of any size -> the models' input: resized to the model's size (resize.h: as
//                 Pillow's BILINEAR), float32 (3, H, W) planes in 0..255.
//   write_mask:   a uint8 mask as PNG (8-bit gray, libpng) or, for a path ending in .pgm, binary PGM: a binary
//                 mask as 0/255 (nonzero -> 255), a label map as its raw values (label 2 -> 2).
//   write_raw:    raw little-endian bytes of a buffer (logits for comparisons).
//
// Files are written to a temporary name in the same folder and renamed over the target, so a failed run
// never leaves half a file and never damages the file already there. Every failure throws
// std::runtime_error with one line naming the file and the problem.
#pragma once

#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cctype>
#include <cerrno>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <iterator>
#include <stdexcept>
#include <string>
#include <vector>

#include "bmp_pnm.h"
#include "jpeg_io.h"
#include "decode_limits.h"
#include "png_io.h"
#include "resize.h"

namespace icmoe {

// 8-bit RGB pixels, row-major (height, width, 3).
struct Rgb8 {
  int width = 0;
  int height = 0;
  std::vector<uint8_t> pixels;
};

// The model's input: (3, H, W) float32 RGB in 0..255.
struct Image {
  int width = 0;
  int height = 0;
  std::vector<float> chw;
};

namespace detail {

// The file's bytes; a file larger than the byte limit is refused before it is read.
inline std::vector<uint8_t> read_file(const std::string& path, const DecodeLimits& limits) {
  struct stat info {};
  if (::stat(path.c_str(), &info) == 0 && S_ISDIR(info.st_mode)) throw std::runtime_error(path + ": a folder, not an image");
  if (::stat(path.c_str(), &info) == 0 && static_cast<uint64_t>(info.st_size) > limits.max_bytes)
    throw std::runtime_error(path + ": file of " + mib(static_cast<uint64_t>(info.st_size)) + " is above the limit of " +
                             mib(limits.max_bytes) + " (" + kMaxBytesEnv + ")");
  std::ifstream in(path, std::ios::binary);
  if (!in) throw std::runtime_error(path + ": cannot open image (" + std::strerror(errno) + ")");
  std::vector<uint8_t> data((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  if (in.bad()) throw std::runtime_error(path + ": cannot read image");
  return data;
}

inline bool starts_with(const std::vector<uint8_t>& data, const char* magic, size_t n) {
  return data.size() >= n && std::memcmp(data.data(), magic, n) == 0;
}

// The Orientation tag (0x0112) of a TIFF-structured EXIF block; 1 (as stored) when absent or unreadable.
inline int tiff_orientation(const uint8_t* p, size_t n) {
  if (n >= 6 && std::memcmp(p, "Exif\0\0", 6) == 0) p += 6, n -= 6;
  if (n < 8 || !(std::memcmp(p, "II", 2) == 0 || std::memcmp(p, "MM", 2) == 0)) return 1;
  const bool big = p[0] == 'M';
  auto u16 = [&](size_t at) { return big ? be(p + at, 2) : le(p + at, 2); };
  auto u32 = [&](size_t at) { return big ? be(p + at, 4) : le(p + at, 4); };
  const size_t ifd = u32(4);
  if (ifd + 2 > n) return 1;
  const size_t entries = u16(ifd);
  for (size_t e = 0; e < entries && ifd + 2 + 12 * (e + 1) <= n; ++e) {
    const size_t at = ifd + 2 + 12 * e;
    const uint32_t type = u16(at + 2);
    if (u16(at) == 0x0112 && (type == 3 || type == 4)) {  // SHORT (as the standard says) or LONG
      const int v = static_cast<int>(type == 3 ? u16(at + 8) : u32(at + 8));
      return v >= 1 && v <= 8 ? v : 1;
    }
  }
  return 1;
}

// EXIF orientation of a JPEG (the first APP1 "Exif") or PNG (eXIf chunk, before or after the image data, as
// Pillow finds it once the image is loaded); 1 for other files.
inline int exif_orientation(const std::vector<uint8_t>& f) {
  if (starts_with(f, "\xFF\xD8", 2)) {
    for (size_t pos = 2; pos + 4 <= f.size() && f[pos] == 0xFF;) {
      const uint8_t marker = f[pos + 1];
      if (marker == 0xDA || marker == 0xD9) break;  // image data: no more metadata
      if (marker == 0xFF) {                         // fill byte
        ++pos;
        continue;
      }
      const size_t len = be(&f[pos + 2], 2);
      if (marker == 0xE1 && len >= 8 && pos + 2 + len <= f.size() && std::memcmp(&f[pos + 4], "Exif\0\0", 6) == 0)
        return tiff_orientation(&f[pos + 10], len - 8);
      pos += 2 + len;
    }
  } else if (starts_with(f, "\x89PNG\r\n\x1a\n", 8)) {
    for (size_t pos = 8; pos + 8 <= f.size();) {
      const size_t len = be(&f[pos], 4);
      if (pos + 12 + len > f.size() || std::memcmp(&f[pos + 4], "IEND", 4) == 0) break;
      if (std::memcmp(&f[pos + 4], "eXIf", 4) == 0) return tiff_orientation(&f[pos + 8], len);
      pos += 12 + len;
    }
  }
  return 1;
}

// The upright image for an EXIF orientation 2..8 (PIL's ImageOps.exif_transpose).
inline Rgb8 apply_orientation(const Rgb8& in, int orientation) {
  if (orientation <= 1 || orientation > 8) return in;
  const bool swap = orientation >= 5;
  Rgb8 out{swap ? in.height : in.width, swap ? in.width : in.height, std::vector<uint8_t>(in.pixels.size())};
  const int W = in.width, H = in.height;
  for (int y = 0; y < out.height; ++y) {
    for (int x = 0; x < out.width; ++x) {
      int sx = x, sy = y;
      switch (orientation) {
        case 2: sx = W - 1 - x; break;                   // Pillow's FLIP_LEFT_RIGHT
        case 3: sx = W - 1 - x, sy = H - 1 - y; break;   // ROTATE_180
        case 4: sy = H - 1 - y; break;                   // FLIP_TOP_BOTTOM
        case 5: sx = y, sy = x; break;                   // TRANSPOSE
        case 6: sx = y, sy = H - 1 - x; break;           // ROTATE_270: a quarter turn clockwise
        case 7: sx = W - 1 - y, sy = H - 1 - x; break;   // TRANSVERSE
        case 8: sx = W - 1 - y, sy = x; break;           // ROTATE_90: a quarter turn counter-clockwise
      }
      std::memcpy(&out.pixels[(static_cast<size_t>(y) * out.width + x) * 3],
                  &in.pixels[(static_cast<size_t>(sy) * W + sx) * 3], 3);
    }
  }
  return out;
}

}  // namespace detail

// Wide gray samples -> 8 bits by the image's own range, as icmoe.data.images.range_to_uint8 computes it
// (float32: (v - min) / (max - min) * 255, rounded half to even); a constant image is all 0.
inline std::vector<uint8_t> range_to_uint8(const std::vector<uint16_t>& values) {
  std::vector<uint8_t> out(values.size(), 0);
  if (values.empty()) return out;
  const auto [lo_it, hi_it] = std::minmax_element(values.begin(), values.end());
  const float lo = *lo_it, span = static_cast<float>(*hi_it) - lo;
  if (span <= 0) return out;
  for (size_t i = 0; i < values.size(); ++i)
    out[i] = static_cast<uint8_t>(std::nearbyint((static_cast<float>(values[i]) - lo) / span * 255.0f));
  return out;
}

namespace detail {

// One colour channel (`channel`) of `channels` interleaved samples, for every pixel.
template <typename T>
std::vector<T> channel_of(const T* data, size_t pixels, int channels, int channel) {
  std::vector<T> out(pixels);
  for (size_t i = 0; i < pixels; ++i) out[i] = data[i * channels + channel];
  return out;
}

// `channels` interleaved 8-bit samples (1 gray, 2 gray+alpha, 3 RGB, 4 RGBA) -> RGB: gray replicated, alpha
// dropped (not composited), as Pillow's convert("RGB").
inline std::vector<uint8_t> to_rgb(const uint8_t* data, size_t pixels, int channels) {
  std::vector<uint8_t> rgb(pixels * 3);
  for (size_t i = 0; i < pixels; ++i)
    for (int c = 0; c < 3; ++c) rgb[i * 3 + c] = data[i * channels + (channels >= 3 ? c : 0)];
  return rgb;
}

// Decoded samples -> 8-bit RGB (see the top of this file).
inline Rgb8 to_rgb8(const Samples& s) {
  const size_t pixels = static_cast<size_t>(s.width) * s.height;
  Rgb8 img{s.width, s.height, {}};
  if (!s.wide) {
    img.pixels = to_rgb(s.bytes.data(), pixels, s.channels);
  } else if (s.gray16_by_range) {
    const std::vector<uint8_t> g = range_to_uint8(channel_of(s.words.data(), pixels, s.channels, 0));
    img.pixels = to_rgb(g.data(), pixels, 1);
  } else {
    std::vector<uint8_t> high(s.words.size());
    for (size_t i = 0; i < high.size(); ++i) high[i] = static_cast<uint8_t>(s.words[i] >> 8);
    img.pixels = to_rgb(high.data(), pixels, s.channels);
  }
  return img;
}

// The decoder for the file's first bytes.
inline Samples decode_any(const std::vector<uint8_t>& file, const std::string& path, const DecodeLimits& limits) {
  if (starts_with(file, "\x89PNG\r\n\x1a\n", 8)) return decode_png(file, path, limits);
  if (starts_with(file, "\xFF\xD8\xFF", 3)) return decode_jpeg(file, path, limits);
  if (starts_with(file, "BM", 2)) return decode_bmp(file, path, limits);
  if (starts_with(file, "P6", 2) || starts_with(file, "P5", 2)) return decode_pnm(file, path, limits);
  throw std::runtime_error(path + ": not a readable PNG, JPEG, BMP or PPM/PGM image (unknown format)");
}

}  // namespace detail

// The upright 8-bit RGB picture of an image file (see the top of this file).
inline Rgb8 load_image(const std::string& path, const DecodeLimits& limits) {
  const std::vector<uint8_t> file = detail::read_file(path, limits);
  if (file.empty()) throw std::runtime_error(path + ": empty file");
  return detail::apply_orientation(detail::to_rgb8(detail::decode_any(file, path, limits)),
                                   detail::exif_orientation(file));
}

inline Image to_chw(const Rgb8& rgb) {
  Image img{rgb.width, rgb.height, std::vector<float>(rgb.pixels.size())};
  const size_t plane = static_cast<size_t>(rgb.width) * rgb.height;
  for (size_t i = 0; i < plane; ++i)
    for (int c = 0; c < 3; ++c) img.chw[c * plane + i] = rgb.pixels[i * 3 + c];
  return img;
}

// The model's input from an image of any size: resized to width x height as Pillow's BILINEAR does.
inline Image model_input(const Rgb8& rgb, int width, int height) {
  Rgb8 sized{width, height, resize_bilinear(rgb.pixels, rgb.width, rgb.height, 3, width, height)};
  return to_chw(sized);
}

namespace detail {

inline mode_t file_mode() {
  const mode_t mask = ::umask(0);
  ::umask(mask);
  return 0666 & ~mask;
}

inline bool ends_with(const std::string& s, const std::string& tail) {
  if (s.size() < tail.size()) return false;
  for (size_t i = 0; i < tail.size(); ++i)
    if (std::tolower(static_cast<unsigned char>(s[s.size() - tail.size() + i])) != tail[i]) return false;
  return true;
}

}  // namespace detail

namespace detail {

// write() all of `bytes`; false on an error (errno says which).
inline bool write_all(int fd, const void* data, size_t bytes) {
  const auto* p = static_cast<const char*>(data);
  while (bytes > 0) {
    const ssize_t n = ::write(fd, p, bytes);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) return false;
    p += n;
    bytes -= static_cast<size_t>(n);
  }
  return true;
}

}  // namespace detail

// Write `header` then `data` to a temporary file next to `path` (".NAME.XXXXXX") and rename it over `path`
// (see the top of this file). The file gets the usual permissions (0666 less the umask).
inline void write_file_atomic(const std::string& path, const std::string& header, const void* data, size_t bytes) {
  const size_t slash = path.rfind('/');
  const std::string folder = slash == std::string::npos ? "" : path.substr(0, slash + 1);
  std::string tmp = folder + "." + path.substr(folder.size()) + ".XXXXXX";
  const int fd = ::mkstemp(tmp.data());
  if (fd < 0) throw std::runtime_error(path + ": cannot write (" + std::strerror(errno) + ")");
  bool ok = detail::write_all(fd, header.data(), header.size()) && detail::write_all(fd, data, bytes) &&
            ::fchmod(fd, detail::file_mode()) == 0;
  const std::string why = std::strerror(errno);
  ok = ::close(fd) == 0 && ok;
  if (ok && std::rename(tmp.c_str(), path.c_str()) == 0) return;
  const std::string reason = ok ? std::strerror(errno) : why;
  ::unlink(tmp.c_str());
  throw std::runtime_error(path + ": " + (ok ? "cannot replace" : "write failed") + " (" + reason + ")");
}

// How a mask path is written, from its extension: ".pgm" binary PGM, ".png" PNG; anything else is an error
// (checked before the model runs).
enum class MaskFormat { png, pgm };

inline MaskFormat mask_format(const std::string& path) {
  if (detail::ends_with(path, ".png")) return MaskFormat::png;
  if (detail::ends_with(path, ".pgm")) return MaskFormat::pgm;
  throw std::runtime_error(path + ": the mask file must end in .png or .pgm");
}

// A (height, width) uint8 mask: binary as 0/255 (nonzero -> 255), `raw_labels` as the values themselves.
inline void write_mask(const std::string& path, const uint8_t* mask, int width, int height, bool raw_labels = false) {
  std::vector<uint8_t> grey(static_cast<size_t>(width) * height);
  for (size_t i = 0; i < grey.size(); ++i) grey[i] = raw_labels ? mask[i] : (mask[i] ? 255 : 0);
  if (mask_format(path) == MaskFormat::pgm) {
    const std::string header = "P5\n" + std::to_string(width) + " " + std::to_string(height) + "\n255\n";
    write_file_atomic(path, header, grey.data(), grey.size());
    return;
  }
  std::string png;
  try {
    png = encode_png(grey.data(), width, height);
  } catch (const std::exception& e) {
    throw std::runtime_error(path + ": " + e.what());
  }
  write_file_atomic(path, "", png.data(), png.size());
}

inline void write_raw(const std::string& path, const void* data, size_t bytes) { write_file_atomic(path, "", data, bytes); }

}  // namespace icmoe
