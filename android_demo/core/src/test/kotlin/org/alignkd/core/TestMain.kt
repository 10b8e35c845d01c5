package org.alignkd.core

import org.junit.runner.JUnitCore
import org.junit.runner.notification.Failure
import org.junit.runner.notification.RunListener
import kotlin.system.exitProcess

/** Runs every test class and ends with "N passed, M failed" (test.sh's runner; Gradle does not need it). */
object TestMain {
    val CLASSES: Array<Class<*>> = arrayOf(
        JsonTest::class.java, BundleVectorsTest::class.java, ImageVectorsTest::class.java,
        TokenizerVectorsTest::class.java, DecodeVectorsTest::class.java, SamplerTest::class.java, BenchmarkTest::class.java,
        ImageTokenCacheTest::class.java
    )

    @JvmStatic
    fun main(args: Array<String>) {
        val core = JUnitCore()
        core.addListener(object : RunListener() {
            override fun testFailure(failure: Failure) {
                println("FAIL ${failure.testHeader}: ${failure.message}")
                println(failure.trace.lines().take(12).joinToString("\n"))
            }
        })
        val result = core.run(*CLASSES)
        val failed = result.failureCount
        val passed = result.runCount - failed
        val skipped = result.ignoreCount
        println("$passed passed, $failed failed" + (if (skipped > 0) ", $skipped skipped" else ""))
        exitProcess(if (failed == 0 && result.runCount > 0) 0 else 1)
    }
}
