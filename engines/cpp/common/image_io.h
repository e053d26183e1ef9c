// Minimal, strict image I/O for the IC-MoE C++ programs: no third-party image library needed.
//
//   read_pnm:  binary PPM (P6, RGB) or PGM (P5, grey, replicated to RGB), maxval 1..255,
//              '#' comments in the header. Returns float32 CHW planes in 0..255, the model's input.
//   write_pgm: binary PGM (P5, maxval 255) of a uint8 mask: a binary mask as 0/255 (nonzero -> 255), a
//              label map as its raw values (label 2 -> 2), so a downstream tool reads the labels back.
//   write_raw: raw little-endian bytes of a buffer (logits for comparisons).
//
// Every failure throws std::runtime_error with one line naming the file and the problem.
#pragma once

#include <cctype>
#include <cstdint>
#include <cstdio>
#include <fstream>
#include <iterator>
#include <stdexcept>
#include <string>
#include <vector>

namespace icmoe {

struct Image {
  int width = 0;
  int height = 0;
  std::vector<float> chw;  // (3, H, W) float32 RGB in 0..255
};

namespace detail {

inline int read_header_int(std::istream& in, const std::string& path) {
  // Skip whitespace and '#' comments, then read a decimal number.
  int c = in.get();
  while (c != EOF && (std::isspace(c) || c == '#')) {
    if (c == '#') {
      while (c != EOF && c != '\n') c = in.get();
    }
    c = in.get();
  }
  if (c == EOF || !std::isdigit(c)) throw std::runtime_error(path + ": damaged PNM header (expected a number)");
  long value = 0;
  while (c != EOF && std::isdigit(c)) {
    value = value * 10 + (c - '0');
    if (value > 1 << 20) throw std::runtime_error(path + ": PNM header number too large");
    c = in.get();
  }
  // Exactly one whitespace character ends the header's last number; put back anything else.
  if (c != EOF && !std::isspace(c)) in.unget();
  return static_cast<int>(value);
}

}  // namespace detail

inline Image read_pnm(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw std::runtime_error(path + ": cannot open image");
  char magic[2] = {0, 0};
  in.read(magic, 2);
  if (!in || magic[0] != 'P' || (magic[1] != '6' && magic[1] != '5'))
    throw std::runtime_error(path + ": not a binary PPM (P6) or PGM (P5) image");
  const int channels = magic[1] == '6' ? 3 : 1;
  Image img;
  img.width = detail::read_header_int(in, path);
  img.height = detail::read_header_int(in, path);
  const int maxval = detail::read_header_int(in, path);
  if (img.width <= 0 || img.height <= 0) throw std::runtime_error(path + ": image has no pixels");
  if (maxval <= 0 || maxval > 255) throw std::runtime_error(path + ": only 8-bit PNM is supported (maxval " + std::to_string(maxval) + ")");
  const size_t plane = static_cast<size_t>(img.width) * img.height;
  std::vector<unsigned char> pixels(plane * channels);
  in.read(reinterpret_cast<char*>(pixels.data()), static_cast<std::streamsize>(pixels.size()));
  if (static_cast<size_t>(in.gcount()) != pixels.size())
    throw std::runtime_error(path + ": truncated image data (" + std::to_string(in.gcount()) + " of " +
                             std::to_string(pixels.size()) + " bytes)");
  img.chw.resize(3 * plane);
  const float scale = 255.0f / static_cast<float>(maxval);
  for (size_t i = 0; i < plane; ++i) {
    for (int c = 0; c < 3; ++c) {
      const unsigned char v = pixels[i * channels + (channels == 3 ? c : 0)];
      img.chw[c * plane + i] = maxval == 255 ? static_cast<float>(v) : static_cast<float>(v) * scale;
    }
  }
  return img;
}

// Write to `path + ".tmp"` and rename, so a failed run never leaves half a file under the real name.
inline void write_file_atomic(const std::string& path, const std::string& header, const void* data, size_t bytes) {
  const std::string tmp = path + ".tmp";
  {
    std::ofstream out(tmp, std::ios::binary | std::ios::trunc);
    if (!out) throw std::runtime_error(path + ": cannot write");
    out.write(header.data(), static_cast<std::streamsize>(header.size()));
    out.write(static_cast<const char*>(data), static_cast<std::streamsize>(bytes));
    out.flush();
    if (!out) throw std::runtime_error(path + ": write failed");
  }
  if (std::rename(tmp.c_str(), path.c_str()) != 0) throw std::runtime_error(path + ": cannot rename " + tmp);
}

inline void write_pgm(const std::string& path, const uint8_t* mask, int width, int height, bool raw_labels = false) {
  std::vector<unsigned char> grey(static_cast<size_t>(width) * height);
  for (size_t i = 0; i < grey.size(); ++i) grey[i] = raw_labels ? mask[i] : (mask[i] ? 255 : 0);
  const std::string header = "P5\n" + std::to_string(width) + " " + std::to_string(height) + "\n255\n";
  write_file_atomic(path, header, grey.data(), grey.size());
}

inline void write_raw(const std::string& path, const void* data, size_t bytes) { write_file_atomic(path, "", data, bytes); }

}  // namespace icmoe
