// BMP and binary PPM/PGM, decoded here (small, fully bounds-checked readers; the fuzz corpus of the tests
// runs through them under AddressSanitizer and UBSan).
//
//   decode_bmp:  uncompressed Windows bitmaps (BITMAPINFOHEADER and its V2..V5 successors): 1, 4 and 8-bit
//                palettes, 24-bit, and 32-bit (BI_RGB, or BI_BITFIELDS with the usual BGRX masks) -> RGB,
//                bottom-up or top-down, as Pillow reads them (the fourth byte of 32-bit pixels ignored).
//                Refused in one line: RLE and other compressions, 16-bit pixels, OS/2 headers, a palette
//                index beyond the palette, pixel data beyond the end of the file.
//   decode_pnm:  binary PPM (P6) / PGM (P5) as Pillow reads them: 8 bits, or rescaled from another maxval; a
//                PGM of more than 8 bits is 16-bit gray mapped by its own range (Samples::gray16_by_range).
//
// Every size is checked against DecodeLimits and against the file's length before anything is allocated.
#pragma once

#include <algorithm>
#include <cctype>
#include <cmath>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

#include "decode_limits.h"

namespace icmoe {
namespace detail {

inline uint32_t be(const uint8_t* p, int bytes) {
  uint32_t v = 0;
  for (int i = 0; i < bytes; ++i) v = (v << 8) | p[i];
  return v;
}

inline uint32_t le(const uint8_t* p, int bytes) {
  uint32_t v = 0;
  for (int i = bytes - 1; i >= 0; --i) v = (v << 8) | p[i];
  return v;
}

struct BmpHeader {
  uint32_t offset = 0, header_size = 0, compression = 0, colors = 0;
  int64_t width = 0, height = 0;  // height < 0: rows top-down
  int bpp = 0;
};

inline BmpHeader bmp_header(const std::vector<uint8_t>& f, const std::string& path) {
  if (f.size() < 54) throw std::runtime_error(path + ": damaged BMP (truncated header)");
  BmpHeader b;
  b.offset = le(&f[10], 4);
  b.header_size = le(&f[14], 4);
  if (b.header_size != 40 && b.header_size != 52 && b.header_size != 56 && b.header_size != 108 &&
      b.header_size != 124)
    throw std::runtime_error(path + ": unsupported BMP header of " + std::to_string(b.header_size) + " bytes");
  if (14u + b.header_size > f.size()) throw std::runtime_error(path + ": damaged BMP (truncated header)");
  b.width = static_cast<int32_t>(le(&f[18], 4));
  b.height = static_cast<int32_t>(le(&f[22], 4));
  b.bpp = static_cast<int>(le(&f[28], 2));
  b.compression = le(&f[30], 4);
  b.colors = le(&f[46], 4);
  if (le(&f[26], 2) != 1) throw std::runtime_error(path + ": damaged BMP (planes != 1)");
  return b;
}

// The BGRX masks of a 32-bit BI_BITFIELDS file (after the 40-byte header, or inside a V2..V5 header).
inline bool bmp_standard_masks(const std::vector<uint8_t>& f, const BmpHeader& b) {
  if (b.header_size == 40 && 54u + 12 > f.size()) return false;
  return le(&f[54], 4) == 0x00FF0000u && le(&f[58], 4) == 0x0000FF00u && le(&f[62], 4) == 0x000000FFu;
}

// Palette entries (BGRX) as RGB triples; checked to lie inside the file.
inline std::vector<uint8_t> bmp_palette(const std::vector<uint8_t>& f, const BmpHeader& b, const std::string& path) {
  const uint64_t most = uint64_t{1} << b.bpp;
  const uint64_t n = b.colors ? b.colors : most;
  if (n > most) throw std::runtime_error(path + ": damaged BMP (" + std::to_string(n) + " palette colours for " +
                                         std::to_string(b.bpp) + "-bit pixels)");
  const uint64_t at = 14u + b.header_size;
  if (at + 4 * n > f.size()) throw std::runtime_error(path + ": damaged BMP (truncated palette)");
  std::vector<uint8_t> rgb(3 * n);
  for (uint64_t i = 0; i < n; ++i)
    for (int c = 0; c < 3; ++c) rgb[3 * i + c] = f[at + 4 * i + 2 - c];
  return rgb;
}

inline void bmp_check_format(const std::vector<uint8_t>& f, const BmpHeader& b, const std::string& path) {
  const bool palette = b.bpp == 1 || b.bpp == 4 || b.bpp == 8;
  const bool direct = b.bpp == 24 || b.bpp == 32;
  if (b.compression == 3 && b.bpp == 32 && bmp_standard_masks(f, b)) return;
  if (b.compression != 0)
    throw std::runtime_error(path + ": unsupported BMP compression " + std::to_string(b.compression) +
                             " (only uncompressed bitmaps are read)");
  if (!palette && !direct) throw std::runtime_error(path + ": unsupported BMP of " + std::to_string(b.bpp) + "-bit pixels");
}

}  // namespace detail

inline Samples decode_bmp(const std::vector<uint8_t>& f, const std::string& path, const DecodeLimits& limits) {
  const detail::BmpHeader b = detail::bmp_header(f, path);
  detail::bmp_check_format(f, b, path);
  const uint64_t w = b.width > 0 ? static_cast<uint64_t>(b.width) : 0;
  const uint64_t h = static_cast<uint64_t>(b.height < 0 ? -b.height : b.height);
  check_limits(path, w, h, 3 + kRgbBytesPerPixel, limits);
  const uint64_t stride = (w * b.bpp + 31) / 32 * 4;
  if (b.offset > f.size() || stride * h > f.size() - b.offset)
    throw std::runtime_error(path + ": damaged BMP (pixel data beyond the end of the file)");
  const std::vector<uint8_t> palette = b.bpp <= 8 ? detail::bmp_palette(f, b, path) : std::vector<uint8_t>{};
  Samples s;
  s.width = static_cast<int>(w), s.height = static_cast<int>(h), s.channels = 3;
  s.bytes.resize(w * h * 3);
  for (uint64_t y = 0; y < h; ++y) {
    const uint8_t* row = f.data() + b.offset + stride * (b.height < 0 ? y : h - 1 - y);
    uint8_t* out = s.bytes.data() + y * w * 3;
    for (uint64_t x = 0; x < w; ++x, out += 3) {
      if (b.bpp >= 24) {
        const uint8_t* p = row + x * (b.bpp / 8);
        out[0] = p[2], out[1] = p[1], out[2] = p[0];
        continue;
      }
      const uint64_t bit = x * b.bpp;
      const uint32_t index = (row[bit / 8] >> (8 - b.bpp - bit % 8)) & ((1u << b.bpp) - 1);
      if (3u * index + 2 >= palette.size())
        throw std::runtime_error(path + ": damaged BMP (palette index " + std::to_string(index) + " beyond the " +
                                 std::to_string(palette.size() / 3) + " colours)");
      std::copy_n(&palette[3u * index], 3, out);
    }
  }
  return s;
}

namespace detail {

// A decimal number of a PNM header, after whitespace and '#' comments; `pos` moves past it.
inline int pnm_number(const std::vector<uint8_t>& f, size_t& pos, const std::string& path) {
  while (pos < f.size() && (std::isspace(f[pos]) || f[pos] == '#')) {
    if (f[pos] == '#')
      while (pos < f.size() && f[pos] != '\n') ++pos;
    else
      ++pos;
  }
  if (pos >= f.size() || !std::isdigit(f[pos])) throw std::runtime_error(path + ": damaged PNM header (expected a number)");
  long value = 0;
  for (; pos < f.size() && std::isdigit(f[pos]); ++pos) {
    value = value * 10 + (f[pos] - '0');
    if (value > 1 << 20) throw std::runtime_error(path + ": PNM header number too large");
  }
  return static_cast<int>(value);
}

// Pillow's PPM decoder for a maxval other than 255 (65535): min(top, round(v / maxval * top)), half to even.
inline uint32_t pnm_rescale(uint32_t v, int maxval, int top) {
  return static_cast<uint32_t>(std::min<double>(top, std::nearbyint(static_cast<double>(v) / maxval * top)));
}

}  // namespace detail

inline Samples decode_pnm(const std::vector<uint8_t>& f, const std::string& path, const DecodeLimits& limits) {
  Samples s;
  s.channels = f[1] == '6' ? 3 : 1;
  size_t pos = 2;
  s.width = detail::pnm_number(f, pos, path);
  s.height = detail::pnm_number(f, pos, path);
  const int maxval = detail::pnm_number(f, pos, path);
  if (pos >= f.size() || !std::isspace(f[pos])) throw std::runtime_error(path + ": damaged PNM header");
  ++pos;  // exactly one whitespace character ends the header
  if (maxval <= 0 || maxval > 65535) throw std::runtime_error(path + ": bad PNM maxval " + std::to_string(maxval));
  const int bytes = maxval > 255 ? 2 : 1;
  check_limits(path, s.width, s.height, s.channels * 2 + kRgbBytesPerPixel, limits);
  const size_t samples = static_cast<size_t>(s.width) * s.height * s.channels, have = f.size() - pos;
  if (have < samples * bytes)
    throw std::runtime_error(path + ": truncated image data (" + std::to_string(have) + " of " +
                             std::to_string(samples * bytes) + " bytes)");
  const uint8_t* p = f.data() + pos;
  if (bytes == 2 && s.channels == 1) {  // 16-bit gray, at 65535 full scale
    s.wide = s.gray16_by_range = true;
    s.words.resize(samples);
    for (size_t i = 0; i < samples; ++i) {
      const uint32_t v = detail::be(p + 2 * i, 2);
      s.words[i] = static_cast<uint16_t>(maxval == 65535 ? v : detail::pnm_rescale(v, maxval, 65535));
    }
    return s;
  }
  s.bytes.resize(samples);
  for (size_t i = 0; i < samples; ++i) {
    const uint32_t v = bytes == 2 ? detail::be(p + 2 * i, 2) : p[i];
    s.bytes[i] = static_cast<uint8_t>(maxval == 255 ? v : detail::pnm_rescale(v, maxval, 255));
  }
  return s;
}

}  // namespace icmoe
