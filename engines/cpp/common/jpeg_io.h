// JPEG through the system's libjpeg-turbo: decoding to 8-bit RGB or gray as Pillow does (the same library,
// with its defaults: the accurate integer DCT, fancy upsampling), so the pixels equal Pillow's.
//
//   decode_jpeg:  baseline or progressive, gray, YCbCr or RGB -> Samples (1 or 3 channels). Size and memory
//                 are checked against DecodeLimits after the header and before any pixel, libjpeg's own
//                 allocations are capped at the byte limit too (progressive files buffer every coefficient),
//                 and a file of more than kMaxJpegScans (500) scans is refused (each scan costs a pass over the
//                 image). Every warning libjpeg gives about damaged data (a premature end, a bad Huffman
//                 code, extraneous bytes) refuses the file, as libjpeg-turbo's "stop on warning" does: a
//                 damaged file is not guessed at. CMYK and YCCK files are refused (not read).
//
// libjpeg reports errors by longjmp; as in png_io.h, the function that calls setjmp owns no C++ object with
// a destructor, and no C++ exception ever passes through libjpeg's frames.
#pragma once

#include <cstdio>  // jpeglib.h needs FILE and size_t first
#include <jpeglib.h>

#include <csetjmp>
#include <cstring>
#include <stdexcept>
#include <string>
#include <vector>

#include "decode_limits.h"

namespace icmoe {

inline constexpr int kMaxJpegScans = 500;

namespace detail {

struct JpegJob {
  jpeg_error_mgr err;  // first: libjpeg's callbacks get it back as cinfo->err
  std::jmp_buf jump;
  jpeg_progress_mgr progress;
  jpeg_decompress_struct cinfo;
  const DecodeLimits* limits;
  Samples* out;
  char message[JMSG_LENGTH_MAX + 64];
  bool over_limit;
};

[[noreturn]] inline void jpeg_fail(j_common_ptr cinfo) {
  auto* job = reinterpret_cast<JpegJob*>(cinfo->err);
  (*cinfo->err->format_message)(cinfo, job->message);
  std::longjmp(job->jump, 1);
}

// Level -1 is a warning about damaged data: an error here. Trace messages (level >= 0) are dropped.
inline void jpeg_message(j_common_ptr cinfo, int level) {
  if (level < 0) jpeg_fail(cinfo);
}

[[noreturn]] inline void jpeg_stop(JpegJob* job, const char* why) {
  std::snprintf(job->message, sizeof job->message, "%s", why);
  std::longjmp(job->jump, 1);
}

inline void jpeg_progress(j_common_ptr cinfo) {
  auto* job = reinterpret_cast<JpegJob*>(cinfo->err);
  if (cinfo->is_decompressor && job->cinfo.input_scan_number > kMaxJpegScans) jpeg_stop(job, "too many scans");
}

inline bool jpeg_allocate(JpegJob* job, size_t bytes) noexcept {
  try {
    job->out->bytes.resize(bytes);
    return true;
  } catch (...) {
    return false;
  }
}

inline bool jpeg_within_limits(JpegJob* job, uint64_t w, uint64_t h, int channels) noexcept {
  job->over_limit = !within_limits(w, h, static_cast<uint64_t>(channels) + kRgbBytesPerPixel, *job->limits, job->message,
                                   sizeof job->message);
  return !job->over_limit;
}

// Gray stays gray, YCbCr and RGB become RGB; false (message set) for the colour spaces not read.
inline bool jpeg_choose_output(JpegJob* job) {
  j_decompress_ptr d = &job->cinfo;
  if (d->jpeg_color_space == JCS_GRAYSCALE) {
    d->out_color_space = JCS_GRAYSCALE;
    return true;
  }
  if (d->jpeg_color_space == JCS_YCbCr || d->jpeg_color_space == JCS_RGB) {
    d->out_color_space = JCS_RGB;
    return true;
  }
  std::snprintf(job->message, sizeof job->message, "CMYK/YCCK JPEG files are not supported");
  return false;
}

// The whole decode; only plain data in this frame. False with job->message set on any error.
inline bool jpeg_decode_into(JpegJob* job, const uint8_t* data, size_t size) {
  j_decompress_ptr d = &job->cinfo;
  if (setjmp(job->jump)) return false;
  jpeg_create_decompress(d);
  d->mem->max_memory_to_use = static_cast<long>(job->limits->max_bytes);
  job->progress.progress_monitor = jpeg_progress;
  d->progress = &job->progress;
  jpeg_mem_src(d, data, static_cast<unsigned long>(size));
  jpeg_read_header(d, TRUE);
  if (!jpeg_choose_output(job)) return false;
  const int channels = d->out_color_space == JCS_GRAYSCALE ? 1 : 3;
  if (!jpeg_within_limits(job, d->image_width, d->image_height, channels)) return false;
  jpeg_start_decompress(d);
  const size_t row = static_cast<size_t>(d->output_width) * d->output_components;
  if (!jpeg_allocate(job, row * d->output_height)) jpeg_stop(job, "out of memory");
  while (d->output_scanline < d->output_height) {
    JSAMPROW rows[1] = {job->out->bytes.data() + d->output_scanline * row};
    if (jpeg_read_scanlines(d, rows, 1) != 1) jpeg_stop(job, "no scanline read");  // a memory source never suspends
  }
  jpeg_finish_decompress(d);
  job->out->width = static_cast<int>(d->output_width);
  job->out->height = static_cast<int>(d->output_height);
  job->out->channels = d->output_components;
  return true;
}

struct JpegHandle {
  JpegJob* job;
  ~JpegHandle() { jpeg_destroy_decompress(&job->cinfo); }  // safe on a struct that was never created (mem NULL)
};

}  // namespace detail

inline Samples decode_jpeg(const std::vector<uint8_t>& file, const std::string& path, const DecodeLimits& limits) {
  Samples out;
  detail::JpegJob job{};
  job.limits = &limits;
  job.out = &out;
  job.cinfo.err = jpeg_std_error(&job.err);
  job.err.error_exit = detail::jpeg_fail;
  job.err.emit_message = detail::jpeg_message;
  detail::JpegHandle handle{&job};
  if (!detail::jpeg_decode_into(&job, file.data(), file.size())) {
    if (job.over_limit) throw std::runtime_error(path + ": " + job.message);
    throw std::runtime_error(path + ": damaged or unsupported JPEG (" + job.message + ")");
  }
  return out;
}

}  // namespace icmoe
