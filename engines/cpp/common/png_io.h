// PNG through the system's libpng (1.6): decoding as Pillow reads the file, and encoding 8-bit gray masks.
//
//   decode_png:  any valid PNG -> Samples as stored: palettes looked up to RGB, gray of 1, 2 or 4 bits scaled
//                to 8 (as Pillow's "1", "L;2", "L;4"), 16 bits kept; no gamma or colour transform (Pillow
//                applies none either). Size and memory are checked against DecodeLimits after the header and
//                before the pixels. A file is refused whole, in one line, for any damage libpng reports as an
//                error, for a bad CRC in any chunk (critical or ancillary: Pillow refuses those too), and for
//                a palette index beyond the palette. What libpng calls benign (e.g. a known-incorrect sRGB
//                profile, common in files from old tools) is accepted, as Pillow accepts it.
//   encode_png:  (height, width) 8-bit gray -> PNG bytes.
//
// libpng reports errors by longjmp. The functions that call setjmp own no C++ object with a destructor
// (their buffers live in objects of the caller, reached through pointers), so the jump skips nothing
// that needs unwinding; no C++ exception ever passes through libpng's frames.
#pragma once

#include <png.h>

#include <csetjmp>
#include <cstdio>
#include <cstring>
#include <new>
#include <stdexcept>
#include <string>
#include <vector>

#include "decode_limits.h"

namespace icmoe {

inline constexpr png_alloc_size_t kPngChunkMax = 8u << 20;  // largest ancillary chunk libpng may allocate

namespace detail {

struct PngSource {
  const uint8_t* data;
  size_t size;
  size_t pos;
};

struct PngJob {
  PngSource source;
  const DecodeLimits* limits;
  Samples* out;
  std::vector<png_bytep>* rows;
  char message[512];  // why it failed
  bool over_limit;    // refused by DecodeLimits, not damaged
};

inline void png_fail(png_structp png, png_const_charp why) {
  auto* job = static_cast<PngJob*>(png_get_error_ptr(png));
  std::snprintf(job->message, sizeof job->message, "%s", why ? why : "unknown libpng error");
  png_longjmp(png, 1);
}

inline void png_ignore_warning(png_structp, png_const_charp) {}  // damage that matters is an error (see top)

inline void png_read_memory(png_structp png, png_bytep into, png_size_t n) {
  auto* job = static_cast<PngJob*>(png_get_io_ptr(png));
  PngSource& s = job->source;
  if (n > s.size - s.pos) png_error(png, "truncated file");
  std::memcpy(into, s.data + s.pos, n);
  s.pos += n;
}

// Out of memory is an error libpng reports, not an exception crossing its frames.
inline bool png_allocate(PngJob* job, size_t rows, size_t row_bytes) noexcept {
  try {
    Samples& s = *job->out;
    if (s.wide)
      s.words.resize(rows * row_bytes / 2);
    else
      s.bytes.resize(rows * row_bytes);
    job->rows->resize(rows);
    uint8_t* base = s.wide ? reinterpret_cast<uint8_t*>(s.words.data()) : s.bytes.data();
    for (size_t y = 0; y < rows; ++y) (*job->rows)[y] = base + y * row_bytes;
    return true;
  } catch (...) {
    return false;
  }
}

inline bool png_within_limits(PngJob* job, png_uint_32 w, png_uint_32 h, size_t row_bytes) noexcept {
  const uint64_t bytes_per_pixel = (w ? row_bytes / w : 1) + (job->out->palette ? 3 : 0) + kRgbBytesPerPixel;
  job->over_limit = !within_limits(w, h, bytes_per_pixel, *job->limits, job->message, sizeof job->message);
  return !job->over_limit;
}

inline void png_set_transforms(png_structp png, png_infop info, Samples* out) {
  const int color = png_get_color_type(png, info), depth = png_get_bit_depth(png, info);
  if (color == PNG_COLOR_TYPE_PALETTE) png_set_packing(png);  // a byte per index, looked up in decode_png
  if (color == PNG_COLOR_TYPE_GRAY && depth < 8) png_set_expand_gray_1_2_4_to_8(png);
  if (depth == 16) png_set_swap(png);  // native byte order on little-endian hosts (no-op on big-endian)
  png_set_interlace_handling(png);
  png_read_update_info(png, info);
  out->width = static_cast<int>(png_get_image_width(png, info));
  out->height = static_cast<int>(png_get_image_height(png, info));
  out->channels = png_get_channels(png, info);
  out->wide = png_get_bit_depth(png, info) == 16;
  out->gray16_by_range = out->wide && color == PNG_COLOR_TYPE_GRAY;  // with or without tRNS: Pillow's "I;16"
  out->palette = color == PNG_COLOR_TYPE_PALETTE;
}

// The whole decode. Only plain data lives in this frame (see the top of the file). Returns false with
// job->message set on any error.
inline bool png_decode_into(png_structp png, png_infop info, PngJob* job) {
  if (setjmp(png_jmpbuf(png))) return false;
  png_set_read_fn(png, job, png_read_memory);
  png_set_crc_action(png, PNG_CRC_ERROR_QUIT, PNG_CRC_ERROR_QUIT);
  png_set_user_limits(png, 1u << 24, 1u << 24);
  png_set_chunk_malloc_max(png, kPngChunkMax);
  png_set_chunk_cache_max(png, 1000);          // ancillary chunks kept at most
  png_read_info(png, info);
  png_set_transforms(png, info, job->out);
  const png_uint_32 w = png_get_image_width(png, info), h = png_get_image_height(png, info);
  const size_t row_bytes = png_get_rowbytes(png, info);
  if (!png_within_limits(job, w, h, row_bytes)) return false;
  if (!png_allocate(job, h, row_bytes)) png_error(png, "out of memory");
  png_read_image(png, job->rows->data());
  png_read_end(png, nullptr);                  // the chunks after the image: CRCs, IEND
  return true;
}

struct PngReadHandles {
  png_structp png = nullptr;
  png_infop info = nullptr;
  ~PngReadHandles() { png_destroy_read_struct(&png, &info, nullptr); }
};

}  // namespace detail

namespace detail {

// Palette indices (one byte each) -> RGB; an index beyond the palette refuses the file (Pillow would show
// it black: the Python readers refuse it too).
inline void png_expand_palette(png_structp png, png_infop info, Samples& s, const std::string& path) {
  png_colorp palette = nullptr;
  int colors = 0;
  if (!png_get_PLTE(png, info, &palette, &colors)) colors = 0;
  std::vector<uint8_t> rgb(s.bytes.size() * 3);
  for (size_t i = 0; i < s.bytes.size(); ++i) {
    const int index = s.bytes[i];
    if (index >= colors)
      throw std::runtime_error(path + ": damaged PNG (palette index " + std::to_string(index) + " beyond the palette's " +
                               std::to_string(colors) + " colours)");
    rgb[3 * i] = palette[index].red, rgb[3 * i + 1] = palette[index].green, rgb[3 * i + 2] = palette[index].blue;
  }
  s.bytes = std::move(rgb);
  s.channels = 3;
  s.palette = false;
}

}  // namespace detail

inline Samples decode_png(const std::vector<uint8_t>& file, const std::string& path, const DecodeLimits& limits) {
  Samples out;
  std::vector<png_bytep> rows;
  detail::PngJob job{{file.data(), file.size(), 0}, &limits, &out, &rows, {}, false};
  detail::PngReadHandles h;
  h.png = png_create_read_struct(PNG_LIBPNG_VER_STRING, &job, detail::png_fail, detail::png_ignore_warning);
  if (h.png) h.info = png_create_info_struct(h.png);
  if (!h.png || !h.info) throw std::runtime_error(path + ": cannot start libpng (out of memory)");
  if (!detail::png_decode_into(h.png, h.info, &job)) {
    if (job.over_limit) throw std::runtime_error(path + ": " + job.message);
    throw std::runtime_error(path + ": damaged PNG (" + job.message + ")");
  }
  if (out.palette) detail::png_expand_palette(h.png, h.info, out, path);
  return out;
}

namespace detail {

struct PngSink {
  std::string* bytes;
  bool failed;
};

inline void png_write_memory(png_structp png, png_bytep data, png_size_t n) {
  auto* sink = static_cast<PngSink*>(png_get_io_ptr(png));
  try {
    sink->bytes->append(reinterpret_cast<const char*>(data), n);
  } catch (...) {
    sink->failed = true;
  }
  if (sink->failed) png_error(png, "out of memory");
}

inline void png_flush_memory(png_structp) {}

inline bool png_encode_into(png_structp png, png_infop info, PngSink* sink, const uint8_t* gray, int width,
                            int height) {
  if (setjmp(png_jmpbuf(png))) return false;
  png_set_write_fn(png, sink, png_write_memory, png_flush_memory);
  png_set_IHDR(png, info, static_cast<png_uint_32>(width), static_cast<png_uint_32>(height), 8, PNG_COLOR_TYPE_GRAY,
               PNG_INTERLACE_NONE, PNG_COMPRESSION_TYPE_DEFAULT, PNG_FILTER_TYPE_DEFAULT);
  png_write_info(png, info);
  for (int y = 0; y < height; ++y) png_write_row(png, gray + static_cast<size_t>(y) * width);
  png_write_end(png, nullptr);
  return true;
}

struct PngWriteHandles {
  png_structp png = nullptr;
  png_infop info = nullptr;
  ~PngWriteHandles() { png_destroy_write_struct(&png, &info); }
};

inline void png_write_error(png_structp png, png_const_charp) { png_longjmp(png, 1); }

}  // namespace detail

// (height, width) 8-bit gray -> the bytes of a PNG file.
inline std::string encode_png(const uint8_t* gray, int width, int height) {
  std::string bytes;
  detail::PngSink sink{&bytes, false};
  detail::PngWriteHandles h;
  h.png = png_create_write_struct(PNG_LIBPNG_VER_STRING, nullptr, detail::png_write_error, detail::png_ignore_warning);
  if (h.png) h.info = png_create_info_struct(h.png);
  if (!h.png || !h.info || !detail::png_encode_into(h.png, h.info, &sink, gray, width, height))
    throw std::runtime_error("cannot encode the mask as PNG (out of memory)");
  return bytes;
}

}  // namespace icmoe
