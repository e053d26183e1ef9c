// What icmoe_aoti and icmoe_trt share about a model's outputs, whatever the model family: output names,
// element types and shapes, and what the programs do with the outputs once they are in host memory.
//
//   split_names:    "logits,mask,expert" (the AOTI package's icmoe.output_names) -> names.
//   element_size:   bytes per element of a NumPy dtype name ("float32", "uint8", ...).
//   Output:         one output in host memory: name, dtype, shape, contiguous row-major data.
//   MaskKind:       what the mask's values mean: binary (0/1) or labels 0..C-1 with C class names, and how
//                   the mask follows from the logits (its rule: threshold, argmax, or none) (make_mask_kind:
//                   from the AOTI package's icmoe.mask_kind / icmoe.class_names / icmoe.mask_rule, or from
//                   icmoe_trt's --classes / --mask-rule).
//   write_outputs:  checks the outputs first (nothing is written when one check fails: a binary mask
//                   holds only 0/1, a label mask only values below the number of classes, and a
//                   (1, K, H, W) logits output of a label model has K = the number of classes), then
//                   writes the mask at the input image's size: with a mask rule (and --upsample logits, the
//                   default) the output named "logits" resized bilinearly to that size channel by channel
//                   (common/resize.h, as the Python side's icmoe.data.images.mask_from_logits), then
//                   thresholded at 0 (binary) or arg-maxed (labels, ties to the lowest); without one the
//                   output named "mask" (uint8 or bool, H*W values ending in (H, W)) resized by nearest
//                   neighbour. As PNG or PGM (by the file's
//                   extension; binary: 0/255; labels: the raw label values), the output named "logits"
//                   as raw float32 at the model's size (all its values: (1, C, H, W) works too) when
//                   asked, and prints to stdout, one "key value" line each (pixel counts are of the
//                   written mask):
//
//                     outputs logits:float32[1,1,128,128] mask:uint8[1,1,128,128] expert:int32[1]
//                     expert 2                       (every other output of at most 16 values)
//                     image 640x480                  (the input's size: the mask's)
//                     upsample logits threshold      (or "upsample nearest": how the mask got there)
//                     label0 9000 background         (label models: pixels per label, then its name)
//                     label1 5000 lesion
//                     foreground 812 of 307200 pixels (pixels that are not 0)
//                     mask mask.png
//                     logits logits.f32              (with --logits)
//
// Every failure throws std::runtime_error with one line.
#pragma once

#include <cstdint>
#include <cstring>
#include <ostream>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

#include "image_io.h"
#include "resize.h"

namespace icmoe {

// Output names of packages and engines written before the names were recorded (IC-MoE only).
inline const char* const kLegacyOutputNames = "logits,mask,expert";
// Other outputs are printed when they hold at most this many values.
inline constexpr int64_t kMaxPrintedValues = 16;

inline std::string first_line(const std::string& s) { return s.substr(0, s.find('\n')); }

inline std::string join(const std::vector<std::string>& items, const std::string& sep) {
  std::string out;
  for (size_t i = 0; i < items.size(); ++i) out += (i ? sep : "") + items[i];
  return out;
}

// "logits, mask,expert" -> {"logits", "mask", "expert"}: spaces around names are dropped; an empty name
// or a name given twice is an error. `what` names the list in messages ("output", "class").
inline std::vector<std::string> split_names(const std::string& list, const std::string& what = "output") {
  std::vector<std::string> names;
  size_t start = 0;
  while (true) {
    const size_t end = list.find(',', start);
    std::string name = list.substr(start, end == std::string::npos ? std::string::npos : end - start);
    const size_t first = name.find_first_not_of(" \t\r\n");
    const size_t last = name.find_last_not_of(" \t\r\n");
    name = first == std::string::npos ? "" : name.substr(first, last - first + 1);
    if (name.empty()) throw std::runtime_error("empty name in the " + what + " name list '" + list + "'");
    for (const auto& seen : names)
      if (seen == name) throw std::runtime_error(what + " name '" + name + "' given twice in '" + list + "'");
    names.push_back(name);
    if (end == std::string::npos) break;
    start = end + 1;
  }
  return names;
}

// Bytes per element of a NumPy dtype name (the names the manifest's tensor specs use).
inline size_t element_size(const std::string& dtype) {
  if (dtype == "float64" || dtype == "int64") return 8;
  if (dtype == "float32" || dtype == "int32") return 4;
  if (dtype == "float16" || dtype == "bfloat16" || dtype == "int16") return 2;
  if (dtype == "uint8" || dtype == "int8" || dtype == "bool") return 1;
  throw std::runtime_error("unsupported element type " + dtype);
}

inline int64_t volume(const std::vector<int64_t>& shape) {
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  return n;
}

struct Output {
  std::string name;
  std::string dtype;            // NumPy name: float32, float16, bfloat16, int64, int32, uint8, bool, ...
  std::vector<int64_t> shape;   // concrete (batch 1)
  const void* data = nullptr;   // host memory, contiguous, row-major, volume(shape) elements

  int64_t numel() const { return volume(shape); }
  size_t bytes() const { return static_cast<size_t>(numel()) * element_size(dtype); }
};

// "logits:float32[1,1,128,128]"
inline std::string describe(const Output& o) {
  std::string s = o.name + ":" + o.dtype + "[";
  for (size_t i = 0; i < o.shape.size(); ++i) s += (i ? "," : "") + std::to_string(o.shape[i]);
  return s + "]";
}

inline std::string describe(const std::vector<Output>& outputs) {
  std::vector<std::string> items;
  for (const auto& o : outputs) items.push_back(describe(o));
  return join(items, " ");
}

inline std::vector<std::string> names_of(const std::vector<Output>& outputs) {
  std::vector<std::string> names;
  for (const auto& o : outputs) names.push_back(o.name);
  return names;
}

inline const Output* find_output(const std::vector<Output>& outputs, const std::string& name) {
  for (const auto& o : outputs)
    if (o.name == name) return &o;
  return nullptr;
}

namespace detail {

template <typename T>
T load(const void* data, int64_t i) {
  T v;
  std::memcpy(&v, static_cast<const unsigned char*>(data) + static_cast<size_t>(i) * sizeof(T), sizeof(T));
  return v;
}

inline float half_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  uint32_t exponent = (h >> 10) & 0x1fu;
  uint32_t mantissa = h & 0x3ffu;
  uint32_t bits;
  if (exponent == 0x1fu) {
    bits = sign | 0x7f800000u | (mantissa << 13);  // inf, nan
  } else if (exponent != 0) {
    bits = sign | ((exponent + 112u) << 23) | (mantissa << 13);  // normal: rebias 15 -> 127
  } else if (mantissa == 0) {
    bits = sign;  // +-0
  } else {  // subnormal: normalise
    exponent = 113;
    while (!(mantissa & 0x400u)) {
      mantissa <<= 1;
      --exponent;
    }
    bits = sign | (exponent << 23) | ((mantissa & 0x3ffu) << 13);
  }
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}

inline float bfloat16_to_float(uint16_t b) {
  const uint32_t bits = static_cast<uint32_t>(b) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}

inline bool is_float(const std::string& dtype) {
  return dtype == "float32" || dtype == "float64" || dtype == "float16" || dtype == "bfloat16";
}

}  // namespace detail

// Element i as a double (every dtype element_size knows).
inline double value_at(const Output& o, int64_t i) {
  const std::string& t = o.dtype;
  if (t == "float32") return detail::load<float>(o.data, i);
  if (t == "float64") return detail::load<double>(o.data, i);
  if (t == "float16") return detail::half_to_float(detail::load<uint16_t>(o.data, i));
  if (t == "bfloat16") return detail::bfloat16_to_float(detail::load<uint16_t>(o.data, i));
  if (t == "int64") return static_cast<double>(detail::load<int64_t>(o.data, i));
  if (t == "int32") return detail::load<int32_t>(o.data, i);
  if (t == "int16") return detail::load<int16_t>(o.data, i);
  if (t == "int8") return detail::load<int8_t>(o.data, i);
  if (t == "uint8" || t == "bool") return detail::load<uint8_t>(o.data, i);
  throw std::runtime_error("output " + o.name + ": unsupported element type " + t);
}

// "2" for an int32 (1,) output, "0.25 -1.5" for two floats.
inline std::string format_values(const Output& o) {
  std::ostringstream s;
  s.precision(7);
  for (int64_t i = 0; i < o.numel(); ++i) {
    if (i) s << " ";
    const double v = value_at(o, i);
    if (detail::is_float(o.dtype))
      s << v;
    else
      s << static_cast<int64_t>(v);
  }
  return s.str();
}

// A floating-point output as float32 values (float32, float16, bfloat16, float64).
inline std::vector<float> to_float32(const Output& o) {
  if (!detail::is_float(o.dtype))
    throw std::runtime_error("output " + o.name + " is " + o.dtype + ", not a floating-point tensor");
  std::vector<float> out(static_cast<size_t>(o.numel()));
  if (o.dtype == "float32") {
    if (!out.empty()) std::memcpy(out.data(), o.data, out.size() * sizeof(float));
  } else {
    for (size_t i = 0; i < out.size(); ++i) out[i] = static_cast<float>(value_at(o, static_cast<int64_t>(i)));
  }
  return out;
}

// The output named "mask": uint8 (or bool), H*W values ending in (H, W); anything else is an error.
inline const Output& mask_output(const std::vector<Output>& outputs, int height, int width) {
  const Output* mask = find_output(outputs, "mask");
  if (!mask)
    throw std::runtime_error("the model has no output named mask (outputs: " + join(names_of(outputs), ", ") + ")");
  if (mask->dtype != "uint8" && mask->dtype != "bool")
    throw std::runtime_error("output mask is " + mask->dtype + ", expected uint8");
  const size_t n = mask->shape.size();
  if (n < 2 || mask->shape[n - 2] != height || mask->shape[n - 1] != width ||
      mask->numel() != static_cast<int64_t>(height) * width)
    throw std::runtime_error("output mask is " + describe(*mask) + ", expected [1,1," + std::to_string(height) + "," +
                             std::to_string(width) + "]");
  return *mask;
}

// What the values of the output named "mask" mean.
struct MaskKind {
  bool labels = false;                   // false: binary 0/1; true: label values 0..C-1
  std::vector<std::string> class_names;  // labels: C names, index = value, 0 = the background
  std::string rule;                      // mask from logits: "threshold" (binary), "argmax" (labels), "" (none)

  std::string describe() const { return labels ? "labels (" + join(class_names, ", ") + ")" : "binary (0/1)"; }
};

// A label mask is uint8 (256 values at most) and has a background and at least one class.
inline constexpr size_t kMaxClasses = 256;

// `rule` "" (none), "threshold" (binary masks) or "argmax" (label masks).
inline void check_rule(const MaskKind& k) {
  if (k.rule.empty() || (k.rule == "threshold" && !k.labels) || (k.rule == "argmax" && k.labels)) return;
  if (k.rule != "threshold" && k.rule != "argmax")
    throw std::runtime_error("mask rule '" + k.rule + "' is neither threshold nor argmax");
  throw std::runtime_error("mask rule '" + k.rule + "' does not fit a " + (k.labels ? "label" : "binary") +
                           " mask (threshold: binary, argmax: labels)");
}

// `kind` "binary" (names must be empty) or "labels" (names: "background,lesion,...", 2..256 of them), and
// how the mask follows from the logits (`rule`, see check_rule).
inline MaskKind make_mask_kind(const std::string& kind, const std::string& names, const std::string& rule = "") {
  MaskKind k;
  k.rule = rule;
  if (kind == "binary") {
    if (!names.empty()) throw std::runtime_error("a binary mask has no class names, got '" + names + "'");
    check_rule(k);
    return k;
  }
  if (kind != "labels") throw std::runtime_error("mask kind '" + kind + "' is neither binary nor labels");
  k.labels = true;
  k.class_names = split_names(names, "class");
  if (k.class_names.size() < 2 || k.class_names.size() > kMaxClasses)
    throw std::runtime_error("a label mask needs 2.." + std::to_string(kMaxClasses) +
                             " class names (background first), got " + std::to_string(k.class_names.size()) +
                             " in '" + names + "'");
  check_rule(k);
  return k;
}

// The mask at (out_h, out_w) from (1, K, height, width) logits: each channel resized as Pillow's float
// BILINEAR (resize_float), then > 0 (threshold, K = 1) or the channel of the largest value (argmax, ties to
// the lowest, K = the number of classes).
inline std::vector<uint8_t> mask_from_logits(const Output& logits, const MaskKind& kind, int height, int width,
                                             int out_w, int out_h) {
  const size_t plane = static_cast<size_t>(height) * width;
  const int64_t channels = logits.shape.size() == 4 ? logits.shape[1] : 0;
  const int64_t want = kind.rule == "threshold" ? 1 : static_cast<int64_t>(kind.class_names.size());
  if (logits.shape.size() != 4 || logits.shape[0] != 1 || logits.shape[2] != height || logits.shape[3] != width ||
      channels != want)
    throw std::runtime_error("output logits is " + describe(logits) + ", expected [1," + std::to_string(want) + "," +
                             std::to_string(height) + "," + std::to_string(width) + "] for mask rule " + kind.rule);
  const std::vector<float> values = to_float32(logits);
  std::vector<std::vector<float>> up;
  for (int64_t c = 0; c < channels; ++c)
    up.push_back(resize_float(values.data() + static_cast<size_t>(c) * plane, width, height, out_w, out_h));
  std::vector<uint8_t> mask(static_cast<size_t>(out_w) * out_h, 0);
  for (size_t i = 0; i < mask.size(); ++i) {
    if (kind.rule == "threshold") {
      mask[i] = up[0][i] > 0.0f ? 1 : 0;
      continue;
    }
    int64_t best = 0;
    for (int64_t c = 1; c < channels; ++c)
      if (up[c][i] > up[best][i]) best = c;
    mask[i] = static_cast<uint8_t>(best);
  }
  return mask;
}

namespace detail {

// Pixels per mask value (256 bins: the mask is uint8).
inline std::vector<int64_t> histogram(const Output& mask) {
  std::vector<int64_t> counts(256, 0);
  const auto* pixels = static_cast<const uint8_t*>(mask.data);
  for (int64_t i = 0; i < mask.numel(); ++i) ++counts[pixels[i]];
  return counts;
}

// The mask's values and a (1, K, H, W) logits output agree with `kind` (see the top of this file).
inline void check_mask_kind(const std::vector<Output>& outputs, const Output& mask, const std::vector<int64_t>& counts,
                            const MaskKind& kind) {
  const size_t allowed = kind.labels ? kind.class_names.size() : 2;
  for (size_t v = allowed; v < counts.size(); ++v) {
    if (counts[v] == 0) continue;
    throw std::runtime_error("output " + mask.name + " holds the value " + std::to_string(v) + " (" +
                             std::to_string(counts[v]) + " pixels), but the mask is " + kind.describe());
  }
  const Output* logits = find_output(outputs, "logits");
  if (kind.labels && logits && logits->shape.size() == 4 &&
      logits->shape[1] != static_cast<int64_t>(kind.class_names.size()))
    throw std::runtime_error("output logits is " + describe(*logits) + ", but the mask has " +
                             std::to_string(kind.class_names.size()) + " classes (" + join(kind.class_names, ", ") +
                             ")");
}

}  // namespace detail

// Where the mask goes: its file, and the size it is written at (the input image's).
struct MaskFile {
  std::string path;
  int width = 0;
  int height = 0;
};

// Checks, then files, then stdout (see the top of this file); `height` x `width` is the model's size.
// `logits_path` empty: no logits file. `upsample` "nearest": the mask resized even where the kind has a rule.
inline void write_outputs(std::ostream& out, const std::vector<Output>& outputs, int height, int width,
                          const MaskFile& mask_file, const std::string& logits_path,
                          const MaskKind& kind = MaskKind{}, const std::string& upsample = "logits") {
  const Output& mask = mask_output(outputs, height, width);
  detail::check_mask_kind(outputs, mask, detail::histogram(mask), kind);
  std::vector<float> logits;
  if (!logits_path.empty()) {
    const Output* found = find_output(outputs, "logits");
    if (!found)
      throw std::runtime_error("--logits: the model has no output named logits (outputs: " +
                               join(names_of(outputs), ", ") + ")");
    logits = to_float32(*found);
  }
  const Output* source = find_output(outputs, "logits");
  const bool from_logits = upsample == "logits" && !kind.rule.empty();
  if (from_logits && !source)
    throw std::runtime_error("mask rule " + kind.rule + " needs an output named logits (outputs: " +
                             join(names_of(outputs), ", ") + ")");
  std::vector<uint8_t> written =
      from_logits ? mask_from_logits(*source, kind, height, width, mask_file.width, mask_file.height)
                  : resize_nearest(static_cast<const uint8_t*>(mask.data), width, height, mask_file.width,
                                   mask_file.height);
  const Output resized{mask.name, "uint8", {mask_file.height, mask_file.width}, written.data()};
  const std::vector<int64_t> counts = detail::histogram(resized);

  std::vector<std::string> lines;
  for (const auto& o : outputs) {
    if (o.name == "mask" || o.name == "logits" || o.numel() > kMaxPrintedValues) continue;
    lines.push_back(o.name + " " + format_values(o));
  }
  lines.push_back("image " + std::to_string(mask_file.width) + "x" + std::to_string(mask_file.height));
  lines.push_back(std::string("upsample ") + (from_logits ? "logits " + kind.rule : "nearest"));
  for (size_t v = 0; kind.labels && v < kind.class_names.size(); ++v)
    lines.push_back("label" + std::to_string(v) + " " + std::to_string(counts[v]) + " " + kind.class_names[v]);

  write_mask(mask_file.path, written.data(), mask_file.width, mask_file.height, kind.labels);
  if (!logits_path.empty()) write_raw(logits_path, logits.data(), logits.size() * sizeof(float));

  out << "outputs " << describe(outputs) << "\n";
  for (const auto& line : lines) out << line << "\n";
  out << "foreground " << resized.numel() - counts[0] << " of " << resized.numel() << " pixels\nmask "
      << mask_file.path << "\n";
  if (!logits_path.empty()) out << "logits " << logits_path << "\n";
}

}  // namespace icmoe
