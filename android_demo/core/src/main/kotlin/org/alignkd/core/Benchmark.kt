package org.alignkd.core

import java.io.File

/**
 * The JSON row that `alignkd-mobile bench --device host` writes (alignkd/bench.py `bench_artifact`),
 * produced on the phone by the headless benchmark (BenchmarkActivity) into the app's files directory, for
 * `bench --device adb` to pull. Same fields ([FIELDS] = the Python FIELDS, checked by
 * tests/test_bench.py), same definitions: medians over n_runs after one warm-up run; each run asks with an
 * empty image-token cache (cold) and then again about the same image (warm);
 * ttft_s = image_encode_s + median prefill time (cold); ttft_warm_s = median of image (cache lookup) +
 * prefill time of the warm asks; prefill_tok_s = prompt positions / median prefill time;
 * decode_tok_s = median over runs of decode steps / decode time, every run decoding max_new_tokens tokens
 * with EOS ignored (null when no run had a decode step: max_new_tokens 1);
 * times rounded to 4 decimals, rates and MiB to 1; peak_rss_mb is the process's peak resident set (VmHWM).
 */
class BenchmarkResult(
    val bundle: String,
    val format: String,
    val quant: String,
    val nRuns: Int,
    val loadS: Double,
    val imageEncodeS: Double,
    val ttftS: Double,
    val ttftWarmS: Double,
    val prefillTokS: Double,
    val decodeTokS: Double?,
    val peakRssMb: Double
) {
    fun toMap(): Map<String, Any?> {
        val m = LinkedHashMap<String, Any?>()
        m["bundle"] = bundle
        m["format"] = format
        m["quant"] = quant
        m["n_runs"] = nRuns
        m["load_s"] = round(loadS, 4)
        m["image_encode_s"] = round(imageEncodeS, 4)
        m["ttft_s"] = round(ttftS, 4)
        m["ttft_warm_s"] = round(ttftWarmS, 4)
        m["prefill_tok_s"] = round(prefillTokS, 1)
        m["decode_tok_s"] = decodeTokS?.let { round(it, 1) }
        m["peak_rss_mb"] = round(peakRssMb, 1)
        return m
    }

    fun toJson(): String = Json.write(toMap(), indent = 2) + "\n"

    /** Written to a temp file and renamed, so a puller never reads half a file. */
    fun writeTo(file: File) {
        file.parentFile?.mkdirs()
        val tmp = File(file.parentFile, ".${file.name}.tmp")
        tmp.writeText(toJson())
        if (!tmp.renameTo(file)) { file.delete(); if (!tmp.renameTo(file)) throw java.io.IOException("cannot write $file") }
    }

    companion object {
        val FIELDS = listOf("bundle", "format", "quant", "n_runs", "load_s", "image_encode_s", "ttft_s", "ttft_warm_s",
            "prefill_tok_s", "decode_tok_s", "peak_rss_mb")

        /** Python's statistics.median. */
        fun median(xs: List<Double>): Double {
            require(xs.isNotEmpty()) { "median of no values" }
            val s = xs.sorted()
            val n = s.size
            return if (n % 2 == 1) s[n / 2] else (s[n / 2 - 1] + s[n / 2]) / 2
        }

        /** Python's round(x, digits) (half-even on the exact binary value). */
        fun round(x: Double, digits: Int): Double =
            if (x.isNaN() || x.isInfinite()) x
            else java.math.BigDecimal(x).setScale(digits, java.math.RoundingMode.HALF_EVEN).toDouble()

        /** The row from the measured cold and warm asks (warm-up excluded), as bench_artifact aggregates them. */
        fun fromRuns(bundle: String, format: String, quant: String, loadS: Double, runs: List<Generation>,
                     warmRuns: List<Generation>, peakRssMb: Double): BenchmarkResult {
            require(runs.isNotEmpty() && warmRuns.isNotEmpty()) { "no benchmark runs" }
            val imageS = median(runs.map { it.timings.imageS })
            val prefillS = median(runs.map { it.timings.prefillS })
            val warmS = median(warmRuns.map { it.timings.imageS + it.timings.prefillS })
            val decode = runs.filter { it.timings.decodeSteps > 0 }.map { it.timings.decodeSteps / it.timings.decodeS }
            return BenchmarkResult(bundle, format, quant, runs.size, loadS, imageS, imageS + prefillS, warmS,
                runs[0].promptLen / prefillS, if (decode.isEmpty()) null else median(decode), peakRssMb)
        }
    }
}

object MemoryStats {
    /** Peak resident set of this process in MiB (VmHWM of /proc/self/status), or -1 where unavailable. */
    fun peakRssMb(): Double = statusKb("VmHWM")?.div(1024.0) ?: -1.0

    fun rssMb(): Double = statusKb("VmRSS")?.div(1024.0) ?: -1.0

    private fun statusKb(key: String): Double? = try {
        File("/proc/self/status").readLines().firstOrNull { it.startsWith("$key:") }
            ?.substringAfter(':')?.trim()?.split(Regex("\\s+"))?.firstOrNull()?.toDouble()
    } catch (e: Exception) {
        null
    }
}

/**
 * The headless benchmark: load (timed, [load] builds the runtime), one warm-up run, then [nRuns] runs of
 * the same image and question, greedy; each run empties the image-token cache, asks for [maxNewTokens]
 * new tokens with EOS ignored (cold), then asks again about the same image for one token (warm: the
 * image tokens come from the cache). Each ask starts a new sequence.
 */
object Benchmark {
    fun run(
        bundle: LoadedBundle,
        load: () -> VlmRuntime,
        image: RgbImage,
        question: String,
        nRuns: Int,
        maxNewTokens: Int,
        quant: String
    ): BenchmarkResult {
        require(nRuns >= 1) { "n_runs must be at least 1, got $nRuns" }
        require(maxNewTokens >= 1) { "max_new_tokens must be at least 1, got $maxNewTokens" }
        val t0 = System.nanoTime()
        val runtime = load()
        val loadS = (System.nanoTime() - t0) * 1e-9
        val session = VlmSession(bundle, runtime)
        val runs = ArrayList<Generation>()
        val warm = ArrayList<Generation>()
        for (i in 0..nRuns) {
            session.imageCache.clear()
            // EOS ignored, as the host bench and llama-bench: a one-word answer leaves no decode step to time
            val g = session.ask(image, question, maxNewTokens, stopAtEos = false).generation
            val w = session.ask(image, question, 1).generation
            check(!g.timings.imageCached && w.timings.imageCached) { "the image-token cache did not miss then hit" }
            if (i > 0) { runs.add(g); warm.add(w) }
        }
        return BenchmarkResult.fromRuns(bundle.name, "pte", quant, loadS, runs, warm, MemoryStats.peakRssMb())
    }
}
